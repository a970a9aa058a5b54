def test_finetune_widget_docks_through_npe2(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "Fine-tune on my labels")
    assert type(widget).__name__ == "FinetuneWidget"
