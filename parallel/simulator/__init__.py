"""The simulator: predicted memory, communication and step time of a layout on a cluster,
and the bookkeeping an emulated run on one machine needs to check the predictions
(collective byte counts, routing histograms). See docs/simulation.md."""
