# The two commands of the README:
#   make book   set up .venv and build the executed HTML book into _build/html
#   make test   set up .venv and run every test (unit tests, every notebook, the book build)
PY := .venv/bin/python

.PHONY: book test setup-book setup-test clean

book: setup-book
	$(PY) scripts/build_book.py --execute

test: setup-test
	$(PY) scripts/run_tests.py

setup-book:
	@bash scripts/setup.sh book

setup-test:
	@bash scripts/setup.sh test

clean:
	rm -rf _build
