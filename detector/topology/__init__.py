"""The topology engine: from an ONNX classifier's structure to per-input and per-population topology.

==================  ==========================================================================================
module              what it holds
==================  ==========================================================================================
``structure``       the layered structure read from the ONNX graph (weights, strides, pads, gates, opaque ops)
``reference_ops``   a NumPy oracle of those ops, for tests
``induced_graph``   the induced graph of Gebhart et al. (edge weight |w h|, real receptive fields, edge budget)
``induced_forest``  its maximum spanning forest block by block, without listing the edges (the fast path)
``persistence``     H0 persistence of the superlevel filtration and its summaries (tested against ripser)
``betti``           Betti-density signatures (Corneanu et al.) and population Betti curves
``graph_features``  the per-input feature vectors the topological scorers read
``population``      population Betti curves of request windows
==================  ==========================================================================================

Scoring (``detector.scorers``), calibration and the baseline artifact live outside this package.
"""
