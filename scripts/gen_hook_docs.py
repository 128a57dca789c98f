"""Write docs/hooks.md from core/src/llmcq/hookspecs.py (tests/test_hook_docs.py checks it)."""

from pathlib import Path

from llmcq.hookspecs import markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
    out.write_text(markdown())
    print(f"wrote {out}")
