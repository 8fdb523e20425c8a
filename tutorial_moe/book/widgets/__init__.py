"""Interactive widgets (ipywidgets) for the book, one module per chapter.

* ``tutorial_moe.book.widgets.topk`` - chapter 05: k slider, regime selector, retrain button.
* ``tutorial_moe.book.widgets.gate_losses`` - chapter 07.

Nothing is imported here, so importing one chapter's widgets never pulls in another's.
"""
