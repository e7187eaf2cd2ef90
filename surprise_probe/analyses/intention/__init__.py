"""The cached-intention analyzer: has a model settled what to talk about before it writes?

- ``analysis``: :func:`analyze_intention`, which runs every measure on every model;
- ``prompts``: the prompts and their topic lexicons (files, the built-in set, token ids); ``config``: the settings;
- ``topics``: labelling a response with the first topic it names;
- ``samples``: sampled responses as labelled records, and their cache on disk;
- ``statistics``: topic entropy and its nested bootstrap;
- ``commitment``: topic entropy at k = 0 and with the first k tokens revealed;
- ``readout``: decoding the topic from the residual stream before the response (logit lens, probe);
- ``prefill``: the prefill-violation test;
- ``results``: what is measured, saved as JSON + HTML; ``plots``: its figures.
"""
