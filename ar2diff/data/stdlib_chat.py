"""Chat records made from the standard library, so the quickstart's diffusion-SFT phase needs no download.

Each top-level function or method of a stdlib file that has a docstring becomes one conversation:
user: "Write `module.qualname(signature)`: <first docstring line>", assistant: the function's source. The key of
a record is the stdlib file's relative path, so the held-out split is by file, like the pre-training corpus.
"""

from __future__ import annotations

import ast

from . import stats as S

MAX_SOURCE_CHARS = 4000  # longer functions are skipped (counted as too_long)


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def chat_records(rel: str, text: str):
    """(messages, reason) for every documented function in one stdlib file; never raises."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        yield None, S.WRONG_TYPE
        return
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    lines = text.splitlines()
    for qualname, node in _functions(tree):
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            continue
        source = "\n".join(lines[node.lineno - 1:node.end_lineno])
        if len(source) > MAX_SOURCE_CHARS:
            yield None, S.TOO_LONG
            continue
        summary = doc.strip().splitlines()[0]
        prompt = f"Write `{module}.{qualname}({ast.unparse(node.args)})`: {summary}"
        yield [{"role": "user", "content": prompt}, {"role": "assistant", "content": source}], ""
