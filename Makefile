.PHONY: test lint bench

test:
	bash .ci/run

lint:
	ruff check .

bench:
	python benchmarks/bench_wht.py
