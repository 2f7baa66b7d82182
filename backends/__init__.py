"""Lowering targets. Each backend turns an analysed cell into Python source text."""
