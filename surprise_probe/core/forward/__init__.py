"""One forward pass: the hook vocabulary, hooked forwards and unembedding, surprise and entropy, the sampler."""
