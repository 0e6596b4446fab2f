"""A two-domain corpus every Python install has, as JSON lines: the standard library's documentation
topics (``docs``) and its source code (``code``). `make demo` and the benchmarks prepare it when no other
text is at hand."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from llmshearing.io.staging import staged_dir

FILES_PER_DOMAIN = 4
CODE_CHARS = 700_000


def build_corpus(raw: Path) -> dict[str, int]:
    """Write ``raw/docs/*.jsonl`` and ``raw/code/*.jsonl``; returns documents per domain."""
    from pydoc_data.topics import topics

    docs = [text for _, text in sorted(topics.items()) if text.strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip() or len(text) > 150_000:
            continue
        code.append(text)
        total += len(text)
        if total >= CODE_CHARS:
            break
    with staged_dir(raw, overwrite=True) as staging:
        for domain, documents in (("docs", docs), ("code", code)):
            (staging / domain).mkdir(parents=True)
            for part in range(FILES_PER_DOMAIN):
                with open(staging / domain / f"part-{part:02d}.jsonl", "w", encoding="utf-8") as handle:
                    for text in documents[part::FILES_PER_DOMAIN]:
                        handle.write(json.dumps({"text": text}) + "\n")
    return {"docs": len(docs), "code": len(code)}
