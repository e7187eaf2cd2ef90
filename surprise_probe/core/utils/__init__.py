"""Small utilities every layer uses: the one JSON writer/reader, output folders, the one bootstrap, the one HTML writer."""
