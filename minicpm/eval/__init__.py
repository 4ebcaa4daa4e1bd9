"""Long-context evaluation: InfiniteBench, needle-in-a-haystack and RULER."""
