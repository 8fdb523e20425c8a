"""Interactive widgets (ipywidgets) for the book, one module per chapter.

* ``tutorial_moe.widgets.topk`` - chapter 04: k slider, regime selector, retrain button.
* ``tutorial_moe.widgets.gate_losses`` - chapter 06.

Nothing is imported here, so importing one chapter's widgets never pulls in another's.
"""
