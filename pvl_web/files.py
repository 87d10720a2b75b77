"""How `pvl-search serve` sends a media file: Starlette's FileResponse (HTTP Range, 206, 416)
with two mends, a Content-Disposition that any file name fits and invalid ranges ignored."""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from starlette.responses import FileResponse, MalformedRangeHeader

# A range-spec with both ends, to find one whose last byte comes before its first.
_BOTH_ENDS = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def content_disposition(name: str) -> str:
    """`attachment` named `name`, for any file name, even one that is not valid UTF-8 (held
    with surrogate escapes: Starlette's own header fails on it with a 500). RFC 6266: a plain
    ASCII `filename=` every client reads, and `filename*=UTF-8''...` (RFC 8187) with the real
    name when the plain one had to change; a byte that is not UTF-8 shows as U+FFFD."""
    text = os.fsencode(name).decode("utf-8", "replace")
    # Printable ASCII only, and no quote, backslash or % (some clients unescape those).
    plain = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in text)
    if plain == text:
        return f'attachment; filename="{plain}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(text, safe='')}"


class MediaResponse(FileResponse):
    """FileResponse whose invalid Range (last byte before the first, an unknown unit, no range
    at all) is ignored, as RFC 9110 section 14.2 asks: the whole file, 200, where Starlette says
    400. An unsatisfiable one (past the end) is still 416."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        _unit, _, specs = http_range.partition("=")
        for spec in specs.split(","):
            both = _BOTH_ENDS.fullmatch(spec)
            if both and int(both[2]) < int(both[1]):
                return []  # invalid before unsatisfiable: Starlette checks the other way round
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # no ranges: Starlette then sends the whole file
