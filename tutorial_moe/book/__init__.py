"""What makes a page of the book: saved results, the evidence protocol, the claim register and
verdict table, tables and source excerpts, plot style, widgets.

It may import the library and ``tutorial_moe.experiments``; neither imports it.
"""
