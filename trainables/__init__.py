"""Ray Tune trainables (the Train driver function and its worker loop). Not written yet: they arrive
with the search-service issue (#3), wrapping ``ifsearch.train.train_loop`` unchanged."""
