"""The chapters' experiment code: each module studies what its name says.

It builds on the library (``tutorial_moe``) and is imported by the book's pages; the library never
imports it.
"""
