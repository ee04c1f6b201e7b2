"""The canonical record every reader produces and every later stage consumes.

A :class:`Record` is one conversation in Hugging Face's "content parts" layout, the one chat
templates and TRL's VLM collators understand; its docstring shows the layout and how media
parts bind to ``images`` / ``videos``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class MediaRef:
    """An image or video: a resolved absolute path, or embedded bytes / a PIL image.

    ``origin`` is the path as written in the source data (for error messages).
    """

    path: str | None = None
    data: Any = None  # bytes or PIL.Image.Image for embedded media (HF datasets)
    origin: str | None = None

    def describe(self) -> str:
        return self.origin or self.path or "<embedded>"


@dataclass
class Record:
    """One conversation in the Hugging Face "content parts" layout::

        Record(
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Kane."}]},
            ],
            images=[MediaRef("/abs/path/1.jpg")],
            source="data.json", index=0, fmt="llamafactory",
        )

    Media parts (``{"type": "image"}`` / ``{"type": "video"}``) appear in ``messages``
    in the same order as ``images`` / ``videos``: the k-th image part is ``images[k]``.
    Preference records (DPO) keep the prompt turns in ``messages`` and one assistant
    turn each in ``chosen`` and ``rejected``.
    """

    messages: list[dict[str, Any]]
    images: list[MediaRef] = field(default_factory=list)
    videos: list[MediaRef] = field(default_factory=list)
    chosen: list[dict[str, Any]] | None = None  # assistant turn(s), preference data only
    rejected: list[dict[str, Any]] | None = None
    source: str = ""  # file the record came from
    index: int | str = 0  # JSON: 0-based index; JSONL: 1-based line number; parquet/arrow: row
    fmt: str = ""  # detected / declared format name

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    @property
    def where(self) -> str:
        """``FILE:RECORD`` as used in every error message."""
        return f"{self.source}:{self.index}"

    def all_turns(self) -> list[dict[str, Any]]:
        turns = list(self.messages)
        if self.chosen:
            turns += self.chosen
        if self.rejected:
            turns += self.rejected
        return turns


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def count_parts(messages: list[dict[str, Any]], kind: MediaKind) -> int:
    return sum(
        1 for m in messages for p in m["content"] if isinstance(p, dict) and p.get("type") == kind
    )


def message_text(message: dict[str, Any]) -> str:
    """The text of a message with media parts dropped."""
    return "".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")


@dataclass(frozen=True)
class Problem:
    """One validation problem: printed as ``FILE:RECORD: reason``."""

    source: str
    index: int | str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.index}: {self.reason}"


class DataError(ValueError):
    """Raised with every problem found (default policy: fail and list them all)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n{lines}{more}")
