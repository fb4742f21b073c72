"""Appendix: the building blocks of the chapters, each written from its equations and proven equal to a
reference implementation. One module per topic; each runs as ``python -m appendix.<topic>``."""
