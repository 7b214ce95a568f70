"""Reference servers the benchmark compares pgws-relay with; none of them is the product."""
