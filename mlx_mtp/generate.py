"""Text generation API and command line, in the style of ``mlx_lm.generate``.

``stream_generate`` yields one ``GenerationResponse`` per generated token
(text segments from mlx-lm's streaming detokenizer); ``generate`` returns the
whole text.  With a ``draft_model`` (a Gemma 4 assistant) decoding is
speculative (MTP): the output distribution is the target's own, drafting only
makes it faster.

Command line::

    python -m mlx_mtp.generate --prompt "def fibonacci(n):"
    mlx_mtp.generate --model mlx-community/gemma-4-e2b-it-4bit \\
        --draft-model mlx-community/gemma-4-E2B-it-assistant-bf16 --prompt "Hello"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Set, Union

import mlx.core as mx

from .errors import DrafterMismatchError, GenerationError, ModelNotFoundError, MtpError
from .sampling import Sampler, check_sampling_args, make_sampler, resolve_sampler

if TYPE_CHECKING:  # the runtime imports are lazy: ``import mlx_mtp`` must stay fast
    from .speculative import GenerationStats

DEFAULT_MAX_TOKENS = 256
DEFAULT_PROMPT = "Hello!"

# Messages shared by the API and the command line (the CLI prints them as ``error: ...``).
EMPTY_PROMPT = "the prompt is empty; give some text to continue (--prompt on the command line)"
DRAFTER_AS_TARGET = (
    "the model is a Gemma 4 assistant drafter, not a target model; pass the target model it was "
    "made for as the model (--model) and this drafter as the draft model (--draft-model)"
)
TARGET_AS_DRAFTER = (
    "the draft model is a Gemma 4 target model, not an assistant drafter; pass the '-assistant' "
    "checkpoint published for this target as the draft model (--draft-model)"
)


@dataclass
class GenerationResponse:
    """One step of ``stream_generate``.

    Attributes:
        text: the text segment produced by this token (may be empty while a
            multi-byte character or a word is incomplete).
        token: the generated token id.
        from_draft: whether the token was proposed by the drafter and accepted.
        finish_reason: ``None`` until the last response, then ``"stop"`` (a stop
            token, which is not part of the text) or ``"length"`` (max_tokens).
        prompt_tokens, prompt_tps: prompt length and prefill speed.
        generation_tokens, generation_tps: tokens so far and decoding speed.
        peak_memory: peak MLX memory in GB.
        stats: the run's ``GenerationStats`` on the last response, else ``None``.
    """

    text: str
    token: int
    from_draft: bool
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    stats: Optional["GenerationStats"] = None


# ---------------------------------------------------------------------------
# prompt handling and validation


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _wrap_tokenizer(tokenizer):
    """mlx-lm's ``TokenizerWrapper`` (streaming detokenizer, stop ids) around ``tokenizer``."""
    if hasattr(tokenizer, "detokenizer"):
        return tokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(tokenizer)


def _quiet_length_warning(tokenizer) -> None:
    """transformers warns when a prompt exceeds ``model_max_length``; ``_check_lengths`` gives
    the real answer (against the model's context), so that warning is only noise."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    flags = getattr(inner, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def _has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def _bos_id(tokenizer) -> Optional[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if _is_int(bos) else None


def _render_chat(tokenizer, prompt: str, system: Optional[str], kwargs: Dict[str, Any]) -> str:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except Exception as exc:  # jinja2.TemplateError, or a template's raise_exception()
        if not _is_template_error(exc):
            raise
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise GenerationError(
            f"the chat template failed ({why}); fix the template in the tokenizer files or send "
            "the raw prompt (--no-chat-template / chat_template=False)"
        ) from None
    if not isinstance(text, str):  # some tokenizers ignore tokenize=False
        text = tokenizer.decode(text)
    return text


def _is_template_error(exc: Exception) -> bool:
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 comes with transformers/mlx-lm
        jinja2 = None
    if jinja2 is not None and isinstance(exc, jinja2.TemplateError):
        return True
    # transformers rejects bad arguments/templates with ValueError/TypeError.
    return isinstance(exc, (ValueError, TypeError, KeyError))


def decode_prompt_bytes(data: bytes) -> str:
    """UTF-8 bytes (e.g. read from stdin) -> prompt text; anything else is a ``GenerationError``."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GenerationError(
            f"the prompt is not valid UTF-8 (byte {exc.start}: {bytes(data)[exc.start : exc.start + 1]!r}); "
            "convert it to UTF-8 first (e.g. iconv -t UTF-8)"
        ) from None


def _check_text(prompt: str) -> None:
    """Text must be encodable: lone surrogates (bytes decoded with errors='surrogateescape')."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GenerationError(
            f"the prompt contains a character that is not valid Unicode text at index {exc.start} "
            f"({prompt[exc.start]!r}, a lone surrogate); decode the input as UTF-8 without "
            "errors='surrogateescape'"
        ) from None


# apply_chat_template arguments that mlx-mtp sets; as "variables" they would change what is rendered.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {
        "conversation",
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "chat_template",
    }
)


def check_chat_template_kwargs(value: Any) -> Optional[Dict[str, Any]]:
    """Extra chat-template variables must be a dict with string keys (or ``None``).

    Variables the template does not use are passed through and ignored by it (as in
    transformers' ``apply_chat_template``); only the shape is checked here.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GenerationError(
            "the chat template variables (--chat-template-config / chat_template_kwargs) must be "
            f"a JSON object / dict of name -> value, got {type(value).__name__}"
        )
    for key in value:
        if not isinstance(key, str):
            raise GenerationError(f"chat template variable names must be strings, got {key!r}")
        if key in _RESERVED_TEMPLATE_ARGS:
            raise GenerationError(
                f"{key!r} is set by mlx-mtp itself, not a chat template variable; remove it "
                "(use --system / --no-chat-template for the prompt's shape)"
            )
    return value


def encode_prompt(
    tokenizer,
    prompt: Union[str, Sequence[int], "mx.array"],
    *,
    system: Optional[str] = None,
    chat_template: bool = True,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
) -> List[int]:
    """Token ids for ``prompt``, exactly one ``<bos>`` first.

    A string goes through the tokenizer's chat template when it has one and
    ``chat_template`` is true (``system`` becomes a system turn; Gemma 4
    templates render ``<bos>`` themselves, so the text is tokenized without
    special tokens); otherwise it is encoded with ``<bos>``.  A list of ids is
    used as given.
    """
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        prompt = decode_prompt_bytes(prompt)
    if isinstance(prompt, mx.array):
        if prompt.ndim != 1:
            raise GenerationError(f"a token-id prompt must be 1-D, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, str):
        try:
            ids = list(prompt)
        except TypeError:
            raise GenerationError(
                f"the prompt must be text or a list of token ids, got {type(prompt).__name__}"
            ) from None
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token")
        if not all(_is_int(t) for t in ids):
            raise GenerationError("a token-id prompt must be a list of integers")
        if system is not None:
            raise GenerationError(
                "system is only used with a text prompt (the chat template renders it); "
                "a token-id prompt is used as given"
            )
        return ids
    if prompt == "":
        raise GenerationError(EMPTY_PROMPT)
    _check_text(prompt)
    kwargs = dict(check_chat_template_kwargs(chat_template_kwargs) or {})
    _quiet_length_warning(tokenizer)
    use_template = chat_template and _has_chat_template(tokenizer)
    bos_id = _bos_id(tokenizer)
    if use_template:
        text = _render_chat(tokenizer, prompt, system, kwargs)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        if system is not None:
            why = "is disabled" if not chat_template else "is missing (this tokenizer has none)"
            raise GenerationError(
                f"a system prompt needs the chat template, which {why}; "
                "put the instructions in the prompt instead"
            )
        bos_text = getattr(tokenizer, "bos_token", None)
        starts_with_bos = isinstance(bos_text, str) and bos_text and prompt.startswith(bos_text)
        ids = list(tokenizer.encode(prompt, add_special_tokens=not starts_with_bos))
    if bos_id is not None:
        if not ids or ids[0] != bos_id:
            ids.insert(0, bos_id)  # a template or tokenizer that does not add <bos>
        while len(ids) > 1 and ids[1] == bos_id:
            ids.pop(1)  # never a double <bos>
    if not ids:
        raise GenerationError("the prompt encodes to no tokens")
    return ids


def _context_length(model) -> Optional[int]:
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    return n if _is_int(n) and n > 0 else None


def _vocab_size(model) -> Optional[int]:
    n = getattr(getattr(model, "args", None), "vocab_size", None)
    return n if _is_int(n) and n > 0 else None


def _check_max_tokens(max_tokens: Any) -> None:
    if not _is_int(max_tokens) or max_tokens < 1:
        raise GenerationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")


def _check_lengths(model, ids: List[int], max_tokens: int) -> None:
    vocab = _vocab_size(model)
    if vocab is not None:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(
                f"prompt token id(s) {bad[:5]} are outside the model's vocabulary (0..{vocab - 1})"
            )
    ctx = _context_length(model)
    if ctx is None:
        return
    if len(ids) >= ctx:
        raise GenerationError(
            f"the prompt is {len(ids)} tokens but the model's context is {ctx} tokens "
            f"(at most {ctx - 1} prompt tokens, to leave room for one new token); "
            "shorten the prompt"
        )
    room = ctx - len(ids)
    if max_tokens > room:
        raise GenerationError(
            f"max_tokens {max_tokens} does not fit: the prompt is {len(ids)} tokens and the "
            f"model's context is {ctx}; use max_tokens <= {room}"
        )


def _check_seed(seed: Any) -> None:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise GenerationError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


def _check_num_draft_tokens(n: Any) -> None:
    if n == "auto":
        return
    if not _is_int(n) or n < 0:
        raise GenerationError(f"num_draft_tokens must be 'auto' or an integer >= 0, got {n!r}")
    from .speculative import MAX_DRAFT_TOKENS

    if n > MAX_DRAFT_TOKENS:
        raise GenerationError(
            f"num_draft_tokens must be 'auto' or an integer in 0..{MAX_DRAFT_TOKENS}, got {n}"
        )


def check_roles(model, draft_model=None) -> None:
    """A Gemma 4 target as ``model`` and an assistant (or nothing) as ``draft_model``."""
    from .models.gemma4 import Model
    from .models.gemma4_assistant import Drafter

    if isinstance(model, Drafter):
        raise DrafterMismatchError(DRAFTER_AS_TARGET)
    if draft_model is not None and isinstance(draft_model, Model):
        raise DrafterMismatchError(TARGET_AS_DRAFTER)
    if not isinstance(model, Model):
        raise GenerationError(
            f"the model must be a Gemma 4 target loaded with mlx_mtp.load, got {type(model).__name__}"
        )


def stop_ids_of(tokenizer) -> Set[int]:
    """Stop ids the tokenizer wrapper carries (``load`` fills them from the checkpoint)."""
    ids: Set[int] = set()
    for t in getattr(tokenizer, "eos_token_ids", None) or ():
        if _is_int(t):
            ids.add(t)
    eos = getattr(tokenizer, "eos_token_id", None)
    if _is_int(eos):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(t for t in eos if _is_int(t))
    return ids


# ---------------------------------------------------------------------------
# API


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Sampler] = None,
    draft_model=None,
    num_draft_tokens: Union[int, str] = "auto",
    system: Optional[str] = None,
    chat_template: bool = True,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
    prefill_step_size: int = 2048,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt``, yielding a ``GenerationResponse`` per token.

    Args:
        model, tokenizer: from ``mlx_mtp.load``.
        prompt: text (chat-templated when the tokenizer has a template and
            ``chat_template`` is true), UTF-8 ``bytes``, or a list of token ids
            (used as given).
        max_tokens: tokens to generate at most (1 .. context - prompt length).
        sampler: an ``mlx_mtp.Sampler`` (``make_sampler(temp, top_p, top_k)``);
            greedy when ``None``.
        draft_model: a Gemma 4 assistant loaded with ``mlx_mtp.load``; enables
            MTP speculative decoding (same output distribution, faster).
        num_draft_tokens: tokens drafted per round, an int >= 0 or ``"auto"``.
        system: system prompt (a system turn of the chat template).
        chat_template_kwargs: extra template variables (e.g. ``enable_thinking``);
            variables the template does not use are ignored by it, names that
            mlx-mtp sets itself (``add_generation_prompt``, ...) are refused.
        seed: seeds MLX's random generator first, and makes sampled text
            reproducible: with a seed, sampling and ``"auto"``, k is fixed at
            ``SEEDED_NUM_DRAFT_TOKENS`` (auto's k schedule follows measured
            timings, and the sample drawn depends on it).
        prefill_step_size: prompt tokens per prefill forward.

    Invalid arguments raise ``GenerationError`` (a ``ValueError``) when called,
    before any work; a mismatched drafter, or a target and a drafter passed in
    each other's place, raises ``DrafterMismatchError``.  Closing the generator
    early, or a ``KeyboardInterrupt`` at any point, is safe: every call builds
    its own cache.
    """
    sampler = resolve_sampler(sampler)
    check_sampling_args(sampler.temperature, sampler.top_p, sampler.top_k)
    _check_max_tokens(max_tokens)
    _check_num_draft_tokens(num_draft_tokens)
    if not _is_int(prefill_step_size) or prefill_step_size < 1:
        raise GenerationError(
            f"prefill_step_size must be an integer >= 1, got {prefill_step_size!r}"
        )
    _check_seed(seed)
    check_roles(model, draft_model)
    tokenizer = _wrap_tokenizer(tokenizer)
    ids = encode_prompt(
        tokenizer,
        prompt,
        system=system,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
    )
    _check_lengths(model, ids, max_tokens)
    if draft_model is not None:
        from .speculative import SEEDED_NUM_DRAFT_TOKENS, check_pair

        check_pair(model, draft_model)
        if seed is not None and not sampler.greedy and num_draft_tokens == "auto":
            num_draft_tokens = SEEDED_NUM_DRAFT_TOKENS
    return _stream(
        model,
        tokenizer,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        stop_ids=stop_ids_of(tokenizer),
        seed=seed,
        prefill_step_size=prefill_step_size,
    )


def _stream(
    model,
    tokenizer,
    ids: List[int],
    *,
    max_tokens: int,
    sampler: Sampler,
    draft_model,
    num_draft_tokens,
    stop_ids: Set[int],
    seed: Optional[int],
    prefill_step_size: int,
) -> Iterator[GenerationResponse]:
    from .speculative import GenerationStats, generate_tokens

    if seed is not None:
        mx.random.seed(seed)
    stats = GenerationStats()
    detokenizer = tokenizer.detokenizer
    tokens = generate_tokens(
        model,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        stop_ids=stop_ids,
        stats=stats,
        prefill_step_size=prefill_step_size,
    )

    def response(text, token, from_draft, n, finish_reason=None) -> GenerationResponse:
        final = finish_reason is not None
        peak = (
            stats.peak_memory_bytes if final and stats.peak_memory_bytes else mx.get_peak_memory()
        )
        return GenerationResponse(
            text=text,
            token=token,
            from_draft=from_draft,
            finish_reason=finish_reason,
            prompt_tokens=len(ids),
            prompt_tps=stats.prompt_tps,
            generation_tokens=n,
            generation_tps=stats.generation_tps,
            peak_memory=peak / 1e9,
            stats=stats if final else None,
        )

    n, token, from_draft = 0, None, False
    try:
        for token, from_draft in tokens:
            n += 1
            stop = token in stop_ids
            if not stop:
                detokenizer.add_token(token)
            if stop or n >= max_tokens:
                tokens.close()  # finalizes stats (timings, peak memory)
                detokenizer.finalize()
                yield response(
                    detokenizer.last_segment, token, from_draft, n, "stop" if stop else "length"
                )
                return
            yield response(detokenizer.last_segment, token, from_draft, n)
        # The token stream ended by itself (it stops after a stop token).
        detokenizer.finalize()
        if n:
            yield response(detokenizer.last_segment, token, from_draft, n, "stop")
    finally:
        tokens.close()


def generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response; returns the text (stop token excluded).

    Takes the arguments of ``stream_generate``.  With ``verbose`` the text is
    printed as it is produced, followed by the statistics.
    """
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        drafting = kwargs.get("draft_model") is not None
        print(format_stats(last, drafting, kwargs.get("num_draft_tokens", "auto")))
    return text


def format_stats(
    response: Optional[GenerationResponse],
    drafting: bool = False,
    num_draft_tokens: Union[int, str, None] = None,
) -> str:
    """The mlx-lm style statistics block for a final response (plus an MTP line)."""
    if response is None:
        return "No text generated for this prompt"
    lines = [
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {response.peak_memory:.3f} GB",
    ]
    stats = response.stats
    if drafting and stats is not None:
        lines.append(_mtp_line(stats, num_draft_tokens))
        warning = _mtp_warning(stats)
        if warning:
            lines.append(warning)
    return "\n".join(lines)


def _mtp_line(stats, num_draft_tokens: Union[int, str, None] = None) -> str:
    k_counts = dict(sorted((getattr(stats, "k_counts", None) or {}).items()))
    hist = ", ".join(f"{k}:{r}" for k, r in k_counts.items())
    if num_draft_tokens == "auto":
        k = f"auto (rounds per k {hist})" if hist else "auto"
    elif num_draft_tokens is not None:
        k = str(num_draft_tokens)
    elif len(k_counts) == 1:
        k = str(next(iter(k_counts)))
    else:
        k = f"varied (rounds per k {hist})" if hist else "-"
    by_pos = getattr(stats, "acceptance_by_position", None)
    if by_pos is None:
        by_pos = list(getattr(stats, "accepted_by_position", []))
    by_pos = "[" + ", ".join(f"{p:.2f}" if isinstance(p, float) else str(p) for p in by_pos) + "]"
    line = (
        f"MTP: k={k}, drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens} "
        f"({100 * stats.acceptance_rate:.1f}%), mean tokens/target forward "
        f"{stats.mean_tokens_per_forward:.2f}, acceptance by position {by_pos}"
    )
    plain_rounds, rounds = k_counts.get(0, 0), sum(k_counts.values())
    if num_draft_tokens == "auto" and rounds and plain_rounds > rounds / 2:
        line += (
            f"\nMTP: auto ran {plain_rounds} of {rounds} target forwards as plain steps: on this "
            "machine verifying drafts measured too costly for the drafts' acceptance "
            "(pass --num-draft-tokens N to force drafting)"
        )
    probes = getattr(stats, "shadow_probes", 0)
    if probes:
        # Shadow probes: drafts scored during plain steps (they keep acceptance measured).
        passed = stats.shadow_accepted / probes
        line += f"\nMTP: {probes} shadow probes during plain steps, mean drafts passed {passed:.2f}"
    return line


def _mtp_warning(stats) -> Optional[str]:
    if stats.drafted_tokens > 0 and stats.accepted_tokens == 0:
        return (
            f"warning: drafting was on but none of the {stats.drafted_tokens} drafted tokens was "
            "accepted, so MTP only cost time; check that --draft-model is the assistant "
            "published for this --model (or run with --no-mtp)"
        )
    return None


# ---------------------------------------------------------------------------
# command line


def _num_draft_tokens_arg(value: str) -> Union[int, str]:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 or 'auto', got {value!r}"
        ) from None


def setup_arg_parser() -> argparse.ArgumentParser:
    """The ``mlx_mtp.generate`` argument parser (mlx-lm flag names)."""
    parser = argparse.ArgumentParser(
        prog="mlx_mtp.generate",
        description=(
            "Generate text with a Gemma 4 model, sped up by an MTP drafter "
            "(lossless speculative decoding). Without --model it runs a bundled tiny demo."
        ),
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Local model folder or Hugging Face repo (MLX or HF layout). "
        "Default: the bundled tiny demo code model with its drafter.",
    )
    parser.add_argument(
        "--draft-model",
        default=None,
        help="The MTP assistant (drafter) made for --model, folder or repo.",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=_num_draft_tokens_arg,
        default="auto",
        help="Tokens drafted per round: an integer >= 0 or 'auto' (adaptive). Default: auto.",
    )
    parser.add_argument(
        "--no-mtp",
        action="store_true",
        help="Plain decoding: do not load or use a drafter.",
    )
    parser.add_argument(
        "--prompt",
        "-p",
        default=None,
        help="Prompt text ('\\n' and '\\t' escapes are expanded), or '-' to read it from stdin.",
    )
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=None,
        help=f"Maximum number of tokens to generate. Default: {DEFAULT_MAX_TOKENS} "
        "(or whatever fits in the context).",
    )
    parser.add_argument(
        "--temp", type=float, default=0.0, help="Sampling temperature (0 = greedy)."
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="Nucleus sampling mass, in (0, 1]."
    )
    parser.add_argument("--top-k", type=int, default=0, help="Top-k sampling (0 = off).")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed for sampling.")
    parser.add_argument("--system", "--system-prompt", default=None, help="System prompt.")
    parser.add_argument(
        "--no-chat-template",
        "--ignore-chat-template",
        dest="no_chat_template",
        action="store_true",
        help="Use the raw prompt, without the tokenizer's chat template.",
    )
    parser.add_argument(
        "--chat-template-config",
        default=None,
        help="JSON object of extra chat template variables, e.g. '{\"enable_thinking\": true}'.",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="Float dtype to load the weights in. 'auto' (default) keeps the checkpoint's dtype. "
        "On a CPU, float32 activations are faster for quantized models: pass --dtype float32.",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="Prompt tokens per prefill forward. Default: 2048.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--verbose",
        action="store_true",
        help="Also print the rounds per draft length and drafter/target timings.",
    )
    verbosity.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="Print only the generated text (no banner, no statistics).",
    )
    return parser


def _read_prompt(arg: Optional[str], demo: bool) -> str:
    if arg is None:
        from .demo import DEMO_PROMPT

        return DEMO_PROMPT if demo else DEFAULT_PROMPT
    if arg == "-":
        data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        return decode_prompt_bytes(data)
    return arg.replace("\\n", "\n").replace("\\t", "\t")


def _template_kwargs(arg: Optional[str]) -> Optional[Dict[str, Any]]:
    if arg is None:
        return None
    try:
        value = json.loads(arg)
    except json.JSONDecodeError as exc:
        raise GenerationError(
            f"--chat-template-config is not valid JSON ({exc}); pass a JSON object such as "
            "'{\"enable_thinking\": true}'"
        ) from None
    return check_chat_template_kwargs(value)


def _load_dtype(choice: str) -> Optional[str]:
    """The dtype to pass to ``load``: ``None`` (``auto``) keeps the checkpoint's."""
    return None if choice == "auto" else choice


def _verbose_lines(stats) -> List[str]:
    lines = [f"Target forwards: {stats.target_forwards} ({stats.rounds} decoding rounds)"]
    if getattr(stats, "k_counts", None):
        hist = ", ".join(f"k={k}: {r}" for k, r in sorted(stats.k_counts.items()))
        lines.append(f"Rounds per draft length: {hist}")
    draft_ms = getattr(stats, "draft_step_ms", 0.0)
    target_ms = getattr(stats, "target_forward_ms", 0.0)
    if draft_ms or target_ms:
        lines.append(
            f"Timed rounds: {draft_ms:.2f} ms per drafter step, "
            f"{target_ms:.2f} ms per target forward"
        )
    return lines


def _run(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    # Validate the cheap things before loading anything.
    sampler = make_sampler(args.temp, args.top_p, args.top_k)
    _check_num_draft_tokens(args.num_draft_tokens)
    if args.max_tokens is not None:
        _check_max_tokens(args.max_tokens)
    _check_seed(args.seed)
    if args.prefill_step_size < 1:
        raise GenerationError(
            f"prefill_step_size must be an integer >= 1, got {args.prefill_step_size!r}"
        )
    template_kwargs = _template_kwargs(args.chat_template_config)
    demo = args.model is None
    prompt = _read_prompt(args.prompt, demo)
    if prompt == "":
        raise GenerationError(EMPTY_PROMPT)
    _check_text(prompt)

    from .loading import get_model_path, load, model_kind, read_config

    draft_path = None if args.no_mtp else args.draft_model
    if demo:
        from .demo import demo_banner, demo_draft_path, demo_model_path

        model_path = demo_model_path()
        drafter = "none" if args.no_mtp else ("custom" if draft_path is not None else "bundled")
        if drafter == "bundled":
            draft_path = demo_draft_path()
        if not model_path.is_dir():
            raise ModelNotFoundError(
                f"the bundled demo model is missing ({model_path}); "
                "reinstall mlx-mtp or pass --model"
            )
        if not args.quiet:
            print(demo_banner(drafter), file=err, flush=True)
    else:
        model_path = args.model

    # Roles from config.json alone, before any weights are read.
    model_dir = get_model_path(str(model_path))
    if model_kind(read_config(model_dir)) == "drafter":
        raise DrafterMismatchError(DRAFTER_AS_TARGET)
    if draft_path is not None:
        draft_dir = get_model_path(str(draft_path))
        if model_kind(read_config(draft_dir)) == "target":
            raise DrafterMismatchError(TARGET_AS_DRAFTER)
        draft_path = draft_dir

    dtype = _load_dtype(args.dtype)
    model, tokenizer = load(model_dir, dtype=dtype)
    draft_model = None
    if draft_path is not None:
        from .speculative import check_pair

        draft_model, draft_tokenizer = load(str(draft_path), dtype=dtype)
        check_pair(model, draft_model, tokenizer, draft_tokenizer)

    ids = encode_prompt(
        tokenizer,
        prompt,
        system=args.system,
        chat_template=not args.no_chat_template,
        chat_template_kwargs=template_kwargs,
    )
    max_tokens = args.max_tokens
    if max_tokens is None:  # the default shrinks to what fits; an explicit value is checked
        ctx = _context_length(model)
        max_tokens = DEFAULT_MAX_TOKENS
        if ctx is not None and len(ids) < ctx:
            max_tokens = min(max_tokens, ctx - len(ids))

    last = None
    wrote_text = False
    try:
        for last in stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=max_tokens,
            sampler=sampler,
            draft_model=draft_model,
            num_draft_tokens=args.num_draft_tokens,
            seed=args.seed,
            prefill_step_size=args.prefill_step_size,
        ):
            if last.text:
                out.write(last.text)
                out.flush()
                wrote_text = True
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        print("[interrupted]", file=err, flush=True)
        return 130
    out.write("\n")
    out.flush()
    if args.quiet:
        warning = _mtp_warning(last.stats) if draft_model is not None and last else None
        if warning:
            print(warning, file=err, flush=True)
        return 0
    blocks = ["", format_stats(last, draft_model is not None, args.num_draft_tokens)]
    if not wrote_text:
        blocks.insert(1, "(no text: the model stopped at once or produced only empty segments)")
    if args.verbose and last is not None and last.stats is not None:
        blocks.extend(_verbose_lines(last.stats))
    print("\n".join(blocks), file=err, flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``mlx_mtp.generate``; exits 2 with ``error: ...`` on bad input."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        code = _run(args)
    except MtpError as exc:
        sys.stdout.flush()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:  # while loading, before any text
        print("\n[interrupted]", file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open("/dev/null", "w")  # silence the flush at exit
        except OSError:
            pass
        code = 0
    if code == 130:
        # An interrupt inside an import that runs code through the C API (as some extensions
        # do while loading) leaves CPython's "unhandled KeyboardInterrupt" flag set, and the
        # interpreter would then end by killing itself with SIGINT instead of exiting 130.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # e.g. the reading end of a pipe is gone
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
