"""Parameter types that Prefect 3.8.8's UI renders as plain fields a person can fill.

``str | None`` renders as a "str | None" switch ("Property is type None") before any box
appears, so an optional parameter is a plain string, list, mapping or number whose empty value
(``""``, ``[]``, ``{}``, ``0``) means "not given". Python callers may still pass ``None``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _none_as(empty: Any) -> BeforeValidator:
    return BeforeValidator(lambda value: empty() if value is None else value)


OptionalText = Annotated[str, _none_as(str)]
"""A text box; empty means "not given"."""
OptionalTexts = Annotated[list[str], _none_as(list)]
"""A list of text boxes; empty means "not given"."""
OptionalNames = Annotated[dict[str, str], _none_as(dict)]
"""A name -> name mapping (a JSON object in the form); empty means "not given"."""
OptionalCount = Annotated[int, Field(ge=0), _none_as(int)]  # constraints first, or the schema loses "minimum"
"""A whole number; 0 means "not given" (the description says what that falls back to)."""


def given(value: Any) -> Any:
    """``value``, or ``None`` when it is the field's empty value: what the library functions take."""
    return value if value else None
