"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.api.schemathesis_hooks``): realistic test data.

The schema says the upload is any binary string; schemathesis then sends small PNGs or random
bytes, which the service rightly refuses (415). The video a generated request uploads is replaced
by a real clip, so that schema-valid requests reach the service's core and must succeed.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from tests.conftest import real_video_paths

CLIP = next(p for p in real_video_paths() if p.name == "mm_part_0.mp4").read_bytes()


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Schema-valid cases upload the real clip (``map_case`` runs in every phase)."""
    meta = getattr(case, "meta", None)
    positive = meta is None or str(meta.generation.mode.value) == "positive"
    body = case.body
    if positive and isinstance(body, dict) and isinstance(body.get("file"), bytes | str):
        case.body = {**body, "file": CLIP}
    return case
