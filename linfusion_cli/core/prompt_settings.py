"""How a prompt is read, besides its text: AUTOMATIC1111's clip skip, the textual-inversion embeddings its words may
name, and what is found rather than given: the embeddings it does name (when the job is planned), the image a
replayed job was read from. Part of the settings table (settings.py), declared here to keep that module to the
settings of the pipeline itself."""

from __future__ import annotations

from ..base.settings import PROMPT_PANEL, WITH_BENCH, Setting, in_range
from ..engine.embeddings import EMBEDDINGS_DEFAULT, EMBEDDINGS_ENV

MAX_CLIP_SKIP = 12  # SD-1.x's CLIP has 12 layers; a deeper skip than the model's own is refused when it loads

PROMPT_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "clip_skip",
        "int",
        1,
        "Stop CLIP this many layers from the end, as AUTOMATIC1111's Clip skip: 2 is its penultimate layer (what "
        "many SD-1.5 fine-tunes are made for); SDXL always uses its penultimate layer \\[default: 1].",
        PROMPT_PANEL,
        WITH_BENCH,
        check=in_range(1, MAX_CLIP_SKIP),
        key_if_default=False,  # added later: images made before it keep their names
        metavar="N",
    ),
    Setting(
        "embeddings",
        "texts",
        None,
        "A folder of textual-inversion embeddings (repeatable; sub-folders too): a prompt word equal to a file's "
        f"name uses its vectors, as AUTOMATIC1111 does; then ${EMBEDDINGS_ENV}, then "
        f"~/.config/linfusion/{EMBEDDINGS_DEFAULT}.",
        PROMPT_PANEL,
        WITH_BENCH,
        in_key=False,  # what decides the pixels is the embeddings a prompt uses: ti_hashes
        path=True,
        metavar="DIR",
    ),
    Setting(
        "ti_hashes",
        "texts",
        None,
        commands=(),  # found from the prompt and the embedding folders when the job is planned
        in_presets=False,
        key_if_default=False,
    ),
    # replay IMAGE: the image whose recorded settings the job was made from (what plan notes and checks read)
    Setting("source_image", "str", None, commands=(), in_key=False, in_presets=False, path=True),
)
