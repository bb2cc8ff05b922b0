"""Analysis of run folders: tables, plots, reports, comparisons and regression checks.

Nothing here imports torch or the implementations: a results folder can be analysed anywhere.
"""
