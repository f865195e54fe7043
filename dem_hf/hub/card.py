"""Model cards rendered offline from a Jinja template, as `huggingface_hub.ModelCard.from_template` renders them,
without importing `huggingface_hub.repocard` (it imports the whole Hub client, about 0.4 s of start-up).

The template gets `card_data` (the YAML metadata block), every field of the card data, and the extra variables;
the text ends with a newline, as `ModelCard.save` writes it. `tests/test_card.py` checks the text equals
`str(ModelCard.from_template(...))` for the same data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub.repocard_data import ModelCardData

__all__ = ["CARD_NAME", "render_card_template", "save_card_text"]

CARD_NAME = "README.md"


def render_card_template(template_path: str | os.PathLike, card_data: ModelCardData, **variables: Any) -> str:
    """The text of a model card: `template_path` rendered with `card_data` (as YAML in `card_data`, and its fields)
    and `variables` (which override the fields).

    Args:
        template_path (`str` or `os.PathLike`):
            A Jinja template whose first lines are `---`, `{{ card_data }}`, `---`.
        card_data (`huggingface_hub.ModelCardData`):
            The YAML metadata (`base_model`, `library_name`, `tags`, ...).
        variables:
            The template's other variables.

    Returns:
        `str`: the whole `README.md`, ending with a newline.

    Example:

    ```python
    >>> from huggingface_hub import ModelCardData
    >>> text = render_card_template("card.md.j2", ModelCardData(library_name="dem_hf"), title="math")
    ```
    """
    import jinja2

    template = jinja2.Template(Path(template_path).read_text(encoding="utf-8"))
    text = template.render(card_data=card_data.to_yaml(), **{**card_data.to_dict(), **variables})
    return text if text.endswith("\n") else text + "\n"


def save_card_text(text: str, path: str | os.PathLike) -> Path:
    """Write the text of a card to `path` as `huggingface_hub.ModelCard.save` does: UTF-8, line breaks as they are,
    parent folders created. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        file.write(text)
    return path
