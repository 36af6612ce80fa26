"""Stage 2's pre-tokenizer presets and the llama.cpp pre-tokenizer types they correspond to.

A pre-tokenizer is a list of regexes applied in sequence: the first splits the text, each next one
splits every piece of the previous one, and text between matches stays a piece of its own. That is how
llama.cpp applies its lists (``unicode_regex_split`` in ``src/unicode.cpp``) and what a Hugging Face
``Sequence`` of ``Split(behavior="isolated")`` does, so one list describes both.

Presets (``tokenizer.pretokenizer``), each a list plus BPE's ``ignore_merges`` and whether the Latin-1
letters are pinned (``dante.tokenizer.PINNED_CHARS``):

- ``dante``: one regex for Italian + English + code (its alternatives are documented in
  ``_dante_pattern``): elisions kept inside the word (``l'intelligenza``), English clitics split off,
  single digits, indentation runs, accented letters pinned. llama.cpp cannot run it: its generic regex
  path (``std::regex``) has no lookbehind, and it refuses a regex that mixes ``\\p{..}`` with a literal
  non-ASCII character (the ``’``).
- ``dante-elision``: the same, except that an elided article or preposition is its own piece
  (``l'`` | ``intelligenza``, ``dell’`` | ``algoritmo``), so the word after it is the word's own token.
- ``llama3``, ``qwen2``, ``gpt2``, ``minerva``: llama.cpp's lists for the pre-tokenizer types
  ``llama-bpe``, ``qwen2``, ``gpt-2`` and ``minerva-7b``, character for character (``LLAMA_CPP_TYPES``,
  transcribed from ``src/llama-vocab.cpp``); ``llama3`` also takes a whole piece that is a token
  (``ignore_merges``), as llama.cpp does for that type.

Two switches change one thing each, so an A/B isolates it: ``digits`` (``single`` | ``group3``; the
preset's own by default: single for dante, qwen2 and minerva, 1-3 for llama3, unbounded runs for gpt2)
and ``accents`` (``pinned`` | ``learned``). A spec string names a variant: ``llama3+digits1``,
``dante+digits3``, ``gpt2+pinned``, ``dante+learned``. ``PreTokenizerSpec.llama_cpp_type`` is the
llama.cpp type that reproduces a spec exactly (same regex list, same ignore_merges), or None; pinning
is only merges of rank 0..k, which a GGUF carries like any merge.

Example::

    spec = parse_spec("llama3+digits1")
    spec.patterns, spec.ignore_merges, spec.llama_cpp_type   # ((QWEN2-like regex,), True, None)
"""

from __future__ import annotations

from dataclasses import dataclass

from dante.errors import UserError

# ---------------------------------------------------------------------------------------------------
# llama.cpp's pre-tokenizer types (facts: src/llama-vocab.cpp, llm_tokenizer_bpe's constructor, and the
# tokenizer.ggml.pre names that select them in llama_vocab::impl::load; llama-cpp-python 0.3.36's copy)
# ---------------------------------------------------------------------------------------------------

LLAMACPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's "adapted" Llama 3 regex: (?i:'s|...) spelled out, because std::regex has no inline flags
LLAMACPP_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMACPP_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMACPP_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                   r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SINGLE_DIGITS = r"\p{N}"
DIGIT_GROUPS = r"\p{N}{1,3}"


@dataclass(frozen=True)
class LlamaCppType:
    """A ``tokenizer.ggml.pre`` name and what llama.cpp does for it: regex list and ignore_merges."""

    name: str
    patterns: tuple[str, ...]
    ignore_merges: bool


#: The types a Dante GGUF can name (or be forced onto with export.gguf_pre_tokenizer). "default" is what
#: llama.cpp falls back to for a name it does not know (with "GENERATION QUALITY WILL BE DEGRADED").
LLAMA_CPP_TYPES: dict[str, LlamaCppType] = {t.name: t for t in (
    LlamaCppType("llama-bpe", (LLAMACPP_LLAMA3,), True),
    LlamaCppType("smaug-bpe", (LLAMACPP_LLAMA3,), False),
    LlamaCppType("qwen2", (LLAMACPP_QWEN2,), False),
    LlamaCppType("qwen35", (LLAMACPP_QWEN35,), False),
    LlamaCppType("gpt-2", (LLAMACPP_GPT2,), False),
    LlamaCppType("minerva-7b", (SINGLE_DIGITS, LLAMACPP_GPT2), False),
    LlamaCppType("default", (r"[\p{P}\$\+<=>\^~\|]+", LLAMACPP_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), False),
)}

# ---------------------------------------------------------------------------------------------------
# The Dante regexes
# ---------------------------------------------------------------------------------------------------

_APOS = r"['’]"  # ASCII and typographic apostrophe (U+2019): Italian text uses both
_LETTER = r"[\p{L}\p{M}]"  # combining marks stay inside words (NFD text, Devanagari vowel signs)
# English clitics are split off only when nothing alphabetic follows ("don't" -> don 't), so an
# Italian elision whose next word merely starts with s/t/d/m ("l'sole" never, but "d'estate") is kept.
_ENGLISH_CLITIC = r"(?i:s|t|re|ve|m|ll|d)(?![\p{L}\p{M}])"
# Python string prefixes r' b' f' u' rb' ... are not elisions: no Italian elided form is one of these
# letters (Italian single-letter elisions are l d c m t s v n), so f'{x}' stays f + '{ as in code models.
_NOT_STRING_PREFIX = r"(?<!\b[rbfuRBFU])(?<!\b(?i:rb|br|fr|rf))"
_WORD = rf"{_LETTER}+(?:{_NOT_STRING_PREFIX}{_APOS}(?!{_ENGLISH_CLITIC}){_LETTER}+)*"
_PLAIN_WORD = rf"{_LETTER}+"


def _dante_pattern(digits: str = "single", elision_pieces: bool = False) -> str:
    """The Dante regex; ``digits`` single (\\p{N}) or group3 (\\p{N}{1,3}); ``elision_pieces`` makes an
    elided prefix its own piece (dante-elision) instead of part of the word (dante)."""
    word = _PLAIN_WORD if elision_pieces else _WORD
    elided = ([
        # dante-elision: an elided article/preposition with its apostrophe, before a letter (l' dell' un'
        # c' quest'), never an English clitic (don't) nor a Python string prefix (r'abc').
        rf"[^\r\n\p{{L}}\p{{M}}\p{{N}}]?{_LETTER}+{_NOT_STRING_PREFIX}{_APOS}(?!{_ENGLISH_CLITIC})(?={_LETTER})",
    ] if elision_pieces else [])
    return "|".join(
        [
            # English clitics as their own piece ('s 't 're 've 'm 'll 'd, any case, either apostrophe).
            rf"{_APOS}{_ENGLISH_CLITIC}",
            *elided,
            # A word at a whitespace boundary, Italian elisions inside it (l'intelligenza, dell'algoritmo,
            # un'altra, c'è), plus a trailing apostrophe when no letter follows: truncations po' be' mo' and
            # elided articles before digits (l'11, dell'800). Restricted to whitespace-led words so that a
            # quoted code string 'abc' keeps its closing quote separate.
            rf"(?: |(?<!\S)){word}(?:{_NOT_STRING_PREFIX}{_APOS}(?![\p{{L}}\p{{M}}]))?",
            # Any other word, with at most one leading non-letter (Llama-3 style: "(x", "«Ciao").
            rf"[^\r\n\p{{L}}\p{{M}}\p{{N}}]?{word}",
            # Digits one by one (Llama 1/2, PaLM, Mistral; Llama 3 and GPT-4 group 1-3). With groups,
            # 1234 is 123|4 and 12345 is 123|45: the same digit lands in different tokens depending on the
            # number's length, which makes arithmetic and number copying harder for a small model (Singh &
            # Strouse 2024, "Tokenization counts"). The price, measured on data/sample/heldout: digits are
            # 0.9% of the Italian, 0.02% of the English and 0.4% of the code characters, and single digits
            # cost 0.5-1% more Italian tokens than 1-3 groups (8K and 24K vocab, same sample).
            SINGLE_DIGITS if digits == "single" else DIGIT_GROUPS,
            # Punctuation / symbol runs (emoji included), an optional leading space, trailing newlines.
            r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*",
            # Newlines with the whitespace before them.
            r"\s*[\r\n]+",
            # Runs of spaces/tabs minus the last one, which joins the next word: 8-space indentation is one
            # 7-space piece + " return", so indentation compresses into a few learned tokens.
            r"\s+(?!\S)",
            r"\s+",
        ]
    )


DANTE_PATTERN = _dante_pattern()
DANTE_ELISION_PATTERN = _dante_pattern(elision_pieces=True)

# ---------------------------------------------------------------------------------------------------
# Presets and the two switches
# ---------------------------------------------------------------------------------------------------

PRESETS = ("dante", "dante-elision", "llama3", "qwen2", "gpt2", "minerva")
DIGITS = ("preset", "single", "group3")
ACCENTS = ("preset", "pinned", "learned")

#: preset -> (its own digit rule, accents pinned by default, ignore_merges)
_PRESET_DEFAULTS = {
    "dante": ("single", True, False),
    "dante-elision": ("single", True, False),
    "llama3": ("group3", False, True),
    "qwen2": ("single", False, False),
    "gpt2": ("runs", False, False),  # " ?\p{N}+": a digit run of any length, after an optional space
    "minerva": ("single", False, False),
}
#: spec-string modifiers -> (switch, value)
_MODIFIERS = {"digits1": ("digits", "single"), "digits3": ("digits", "group3"),
              "pinned": ("accents", "pinned"), "learned": ("accents", "learned")}


@dataclass(frozen=True)
class PreTokenizerSpec:
    """A preset with its two switches; everything a tokenizer's splitting depends on."""

    preset: str
    digits: str = "preset"
    accents: str = "preset"

    def __post_init__(self):
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown pre-tokenizer preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.digits not in DIGITS:
            problems.append(f"unknown digits setting {self.digits!r}; choose one of {', '.join(DIGITS)}")
        if self.accents not in ACCENTS:
            problems.append(f"unknown accents setting {self.accents!r}; choose one of {', '.join(ACCENTS)}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def digit_rule(self) -> str:
        """single, group3, or runs (gpt2's own)."""
        return _PRESET_DEFAULTS[self.preset][0] if self.digits == "preset" else self.digits

    @property
    def pinned(self) -> bool:
        return _PRESET_DEFAULTS[self.preset][1] if self.accents == "preset" else self.accents == "pinned"

    @property
    def ignore_merges(self) -> bool:
        return _PRESET_DEFAULTS[self.preset][2]

    @property
    def patterns(self) -> tuple[str, ...]:
        """The regex list, applied in sequence (module docstring)."""
        d = self.digit_rule
        if self.preset in ("dante", "dante-elision"):
            return (_dante_pattern(d, elision_pieces=self.preset == "dante-elision"),)
        if self.preset in ("llama3", "qwen2"):
            return (LLAMACPP_LLAMA3 if d == "group3" else LLAMACPP_QWEN2,)
        # gpt2 / minerva: GPT-2's regex, after a digit split unless digits come in GPT-2's own runs
        return (LLAMACPP_GPT2,) if d == "runs" else ({"single": SINGLE_DIGITS, "group3": DIGIT_GROUPS}[d], LLAMACPP_GPT2)

    @property
    def name(self) -> str:
        """Canonical spec string: the preset, plus a modifier for each switch that differs from it."""
        digits0, pinned0, _ = _PRESET_DEFAULTS[self.preset]
        mods = []
        if self.digit_rule != digits0:
            mods.append("digits1" if self.digit_rule == "single" else "digits3")
        if self.pinned != pinned0:
            mods.append("pinned" if self.pinned else "learned")
        return "+".join([self.preset, *mods])

    @property
    def key(self) -> tuple:
        """Two specs with the same key split and merge identically (gpt2+digits1 is minerva)."""
        return self.patterns, self.ignore_merges, self.pinned

    @property
    def llama_cpp_type(self) -> str | None:
        """The llama.cpp pre-tokenizer type that reproduces this spec's ids exactly, or None."""
        return llama_cpp_type_of(self.patterns, self.ignore_merges)

    def gguf_verdict(self) -> str:
        """One line for reports: which GGUF type carries it, or why none does."""
        t = self.llama_cpp_type
        if t:
            return f"yes ({t})"
        if self.preset.startswith("dante"):
            return "no (llama.cpp cannot run the Dante regex: lookbehinds, (?i:), a literal ’ beside \\p{L})"
        return "no (no llama.cpp type has this regex list and merge rule)"


def parse_spec(text: str, digits: str = "preset", accents: str = "preset") -> PreTokenizerSpec:
    """``"llama3+digits1"`` -> PreTokenizerSpec; ``digits``/``accents`` apply unless a modifier says otherwise."""
    preset, *mods = str(text).strip().split("+")
    switches = {"digits": digits, "accents": accents}
    for mod in mods:
        if mod not in _MODIFIERS:
            raise UserError(f"pre-tokenizer {text!r}: unknown modifier {mod!r}; use {', '.join('+' + m for m in _MODIFIERS)}")
        switch, value = _MODIFIERS[mod]
        switches[switch] = value
    return PreTokenizerSpec(preset, **switches)


def all_specs() -> list[PreTokenizerSpec]:
    """Every preset x digits x accents (for recognizing a saved tokenizer), canonical ones first."""
    return [PreTokenizerSpec(p, d, a) for d in ("preset", "single", "group3") for a in ("preset", "pinned", "learned")
            for p in PRESETS]


def spec_from_saved(patterns: tuple[str, ...], ignore_merges: bool, pinned: bool) -> str:
    """The canonical name of the spec a saved tokenizer was built with, or "custom"."""
    return next((s.name for s in all_specs() if s.key == (tuple(patterns), ignore_merges, pinned)), "custom")


def llama_cpp_type_of(patterns: tuple[str, ...], ignore_merges: bool) -> str | None:
    """The llama.cpp type whose regex list and merge rule are exactly these, or None."""
    return next((t.name for t in LLAMA_CPP_TYPES.values()
                 if t.patterns == tuple(patterns) and t.ignore_merges == ignore_merges), None)


def ab_specs(entries: list[str], main: PreTokenizerSpec, baseline: PreTokenizerSpec | None
             ) -> tuple[list[PreTokenizerSpec], list[str], list[str]]:
    """tokenizer.ab_presets -> (specs to train besides the run's tokenizer and the baseline, problems, notes).

    Unknown entries and entries that repeat one another (the same string, or two spellings of one split,
    e.g. gpt2+digits1 and minerva) are problems; an entry equal to the run's tokenizer or the baseline is
    not trained twice (a note says so)."""
    specs, problems, notes, seen = [], [], [], {}
    taken = {main.key: "the run's tokenizer (tokenizer.pretokenizer)"}
    if baseline is not None:
        taken.setdefault(baseline.key, "the A/B baseline (tokenizer.baseline_pretokenizer)")
    for i, entry in enumerate(entries):
        try:
            spec = parse_spec(entry)
        except UserError as err:
            problems.append(f"tokenizer.ab_presets[{i}]: {err}")
            continue
        if spec.key in seen:
            problems.append(f"tokenizer.ab_presets[{i}]={entry!r} repeats entry {seen[spec.key]!r} (the same split"
                            + (f": {spec.name}" if spec.name != entry else "") + "); list each pre-tokenizer once")
            continue
        seen[spec.key] = entry
        if spec.key in taken:
            notes.append(f"tokenizer.ab_presets entry {entry!r} is {taken[spec.key]}: trained once")
            continue
        specs.append(spec)
    return specs, problems, notes
