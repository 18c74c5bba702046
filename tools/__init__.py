"""The repository's own tools: what checks kmask, not what `pip install kmask` ships."""
