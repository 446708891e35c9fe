"""Labeled data: read files into records, render them to text, encode with a label mask, batch."""
