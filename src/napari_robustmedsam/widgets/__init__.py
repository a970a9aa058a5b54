"""napari widgets of the plugin (all Qt / napari code of the project lives in this package).

Nothing is imported here so that npe2 can load single contributions (sample data, writer) cheaply:

- :mod:`.main_widget` - everything in one dock (model, annotator, degradation preview, sweep, export, series)
- :mod:`.model_panel`, :mod:`.annotator`, :mod:`.degradation_preview`, :mod:`.robustness_sweep`,
  :mod:`.export_panel`, :mod:`.image_series` - the same panels as separate docks
- :mod:`.npe2_hooks` - sample data and the labels writer (no Qt)
"""
