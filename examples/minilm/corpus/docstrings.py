"""Writes computing prose for $FACTORIZE_MINILM_CORPUS: the first sentences of the docstrings
of Python's standard library (PSF licence), the plain-English ones only (see README.md).

Usage: python3 docstrings.py LIB --held-out sentences.json > docstrings.txt, where LIB is the
standard library's folder (/usr/lib/python3.11 on Debian). The docstrings change between
Python versions; README.md records the one measured.
"""
import argparse
import ast
import os
import re

from extract import held_out_runs, key, runs

MIN_WORDS, MAX_WORDS = 6, 30
# Folders of tests, tools and third-party packages, not the library's own documentation.
SKIPPED = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}
# Code rather than prose: identifiers, calls, paths, markup, long numbers, dotted names.
CODE = re.compile(r"[_=(){}\[\]<>*`#@|\\/:;]|\d\d\d|--|\.\w")
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def sentences(doc):
    """The sentences of a docstring's first paragraph."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+", paragraph)


def prose(sentence):
    return (
        MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
        and sentence[0].isupper()
        and sentence.endswith(".")
        and sentence.isascii()
        and not CODE.search(sentence[:-1])
    )


def docstrings(lib):
    for folder, subfolders, files in os.walk(lib):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or in other encodings
            for node in ast.walk(tree):
                if isinstance(node, DOCUMENTED) and (doc := ast.get_docstring(node)):
                    yield doc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("lib")
    parser.add_argument("--held-out", metavar="SENTENCES_JSON", required=True)
    args = parser.parse_args()
    banned = held_out_runs(args.held_out)
    seen = set()
    for doc in docstrings(args.lib):
        for sentence in filter(prose, sentences(doc)):
            if key(sentence) not in seen and not runs(sentence) & banned:
                seen.add(key(sentence))
                print(sentence)


if __name__ == "__main__":
    main()
