"""Command line: `python -m stablelm generate | convert | info | check-op`.

    python -m stablelm generate --model DIR --prompt "..." [--max-new-tokens N] [--do-sample] [--temperature T]
                                [--top-k K] [--top-p P] [--repetition-penalty R] [--num-beams N] [--seed S]
                                [--chat] [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--tp N]
                                [--no-check-finite]
    python -m stablelm generate --prompt "hi"     # no --model: tiny random-weight model, byte-level ids
    torchrun --nproc-per-node N -m stablelm generate --model DIR --tp N --prompt "..."   # tensor parallel
    python -m stablelm convert SRC DST [--dtype ...] [--quant int8|int4|nf4 [--quantize-head]
                               [--quantize-embedding (int8|int4)]] [--group-size G] [--to-hf] [--overwrite]
    python -m stablelm info --model DIR
    python -m stablelm check-op OP MODULE:FUNCTION [--device cpu|cuda] [--json OUT] [--seeds N] [--model] [--speed]

Generated text streams to stdout as tokens arrive (beam search prints at the end, with a progress bar); notes,
timings and tokens/s go to stderr, so stdout holds only the text.

Decoding is greedy unless --do-sample or --temperature T > 0 is given, as transformers' generate() (do_sample
defaults to False; temperature/top-k/top-p only apply when sampling). When sampling, --top-k defaults to 50 and
--top-p to 1.0, transformers' defaults; --top-k 0 / --top-p 1.0 turn those filters off. A filter given without
sampling is an error rather than being ignored.

A user error (a missing or broken checkpoint, a bad flag, NaN/inf weights or logits, no CUDA for --device cuda)
prints `error: ...` and exits with status 2; a closed stdout (`... | head`) ends the command quietly (status 141,
as a process killed by SIGPIPE). `~` in paths is expanded.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import oplab, parallel
from .checkpoint import (DTYPES, FORMAT, INT4_GROUP_SIZE, QUANT_BITS, convert_hf_dir, export_hf_dir, is_hf_dir,
                         read_config)
from .config import preset
from .convert import CheckpointError, _rust_errors_too, project_shapes, read_json, weight_files
from .generate import NonFiniteLogitsError

RANDOM_NOTE = ("note: no --model given, so this is the built-in tiny model with RANDOM weights and byte-level token "
               "ids: the text is noise. Pass --model DIR (a converted or Hugging Face checkpoint) for real output.")


class ByteTokenizer:
    """The fallback without a checkpoint: a token id is one UTF-8 byte (0-255). Ids >= 256 (the tiny model's
    vocabulary is 512) are no byte and have no text, as a Tokenizer gives ids past its vocabulary none."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def stream_decoder(self) -> "_ByteStream":
        return _ByteStream()


class _ByteStream:
    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's default shown, unless it is unset (None / False) or its help
    already says it."""

    def _get_help_string(self, action):
        help = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in help or not action.option_strings:
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


def human_count(n: int) -> str:
    """136448 -> '136.4K', 3_700_000 -> '3.7M', 2_795_443_200 -> '2.8B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def check_device(device: str) -> str:
    """`device` if torch can use it here; otherwise a ValueError saying why (not torch's AssertionError from deep
    inside its CUDA initialisation)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_model_dir(path) -> Path:
    """A checkpoint directory (`~` expanded) or a FileNotFoundError saying what is missing: the directory, or the
    config.json that makes it a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a model directory (a checkpoint is a directory with config.json)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json (convert a Hugging Face "
                                f"checkpoint with `python -m stablelm convert SRC DST`, or pass the directory "
                                f"holding config.json)")
    return path


# ---------------------------------------------------------------- generate
def _load(args):
    """(model, tokenizer, stop ids, pad id) for the arguments."""
    import stablelm
    from .model import StableLM
    from .tokenizer import Tokenizer

    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.model is None:
        _log(RANDOM_NOTE)
        model = StableLM.random(preset("tiny"), device=args.device, dtype=dtype)
        return model, ByteTokenizer(), list(model.config.eos_token_id), None
    t0 = time.perf_counter()
    model_dir = check_model_dir(args.model)  # before the tokenizer, so a wrong path is named as the model's
    _log(f"loading {model_dir} on {args.device} ({dtype}) ...")
    tokenizer = Tokenizer.from_dir(model_dir)
    model = stablelm.load(model_dir, device=args.device, dtype=dtype, tp=args.tp,
                          check_finite=not args.no_check_finite)
    if args.tp:
        parallel.print_on_rank0_only()  # every rank generates the same text; rank 0 prints it
    _log(f"loaded {human_count(model.num_params())} parameters in {time.perf_counter() - t0:.1f} s")
    stop_ids = list(tokenizer.eos_ids) or list(model.config.eos_token_id)
    return model, tokenizer, stop_ids, tokenizer.pad_id


def _prompt_ids(args, tokenizer) -> list[int]:
    if not args.chat:
        return tokenizer.encode(args.prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    # The rendered template already holds its special tokens (bos included where the template wants one).
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, used when sampling


def _sampling_options(args, parser) -> dict:
    """transformers' rule: greedy unless sampling is asked for (--do-sample, or --temperature > 0); top-k/top-p
    filter sampled tokens only. A filter that would do something under greedy decoding is refused, not ignored."""
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.do_sample and args.temperature == 0:
        parser.error("--temperature 0 means greedy decoding; --do-sample needs a temperature > 0 (or none: 1.0)")
    sampling = args.do_sample or bool(args.temperature)
    if not sampling:
        filters = [f for f, on in (("--top-k", args.top_k not in (None, 0)),
                                   ("--top-p", args.top_p not in (None, 1.0))) if on]
        if filters:
            why = "--temperature 0 means greedy decoding" if args.temperature == 0 else "decoding is greedy"
            parser.error(f"{why}; {' and '.join(filters)} {'is' if len(filters) == 1 else 'are'} only used when "
                         f"sampling: add --do-sample or --temperature T > 0")
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature or 1.0,
            "top_k": DEFAULT_TOP_K if args.top_k is None else args.top_k,
            "top_p": 1.0 if args.top_p is None else args.top_p, "seed": args.seed}


def cmd_generate(args, parser) -> int:
    from .generate import GenerationConfig, generate

    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                  repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                                  length_penalty=args.length_penalty, cuda_graph=not args.no_cuda_graph,
                                  **_sampling_options(args, parser))
    except ValueError as e:
        parser.error(str(e))
    if args.tp is not None and args.model is None:
        parser.error("--tp needs --model DIR (a checkpoint each rank reads its slices of)")
    if args.chat and args.model is None:
        parser.error("--chat needs a checkpoint's tokenizer and chat template (pass --model DIR)")
    check_device(args.device)
    model, tokenizer, stop_ids, pad_id = _load(args)
    ids = _prompt_ids(args, tokenizer)
    if not ids:
        parser.error("the prompt encodes to no tokens")
    config = config.replace(stop_ids=tuple(stop_ids), pad_id=pad_id)
    input_ids = torch.tensor([ids], device=args.device)
    decoder = tokenizer.stream_decoder()
    stops = set(stop_ids)
    n_tokens, first_at = 0, None

    def text_of(token_id: int) -> str:
        # A model's embedding is often larger than its tokenizer's vocabulary: the decoder gives those ids no
        # text, as transformers' decode does.
        return decoder.push(token_id)

    def stream(tokens: torch.Tensor) -> None:
        # One prompt: generation ends right after the first stop id, so no padding arrives here.
        nonlocal n_tokens, first_at
        token_id = int(tokens[0])
        n_tokens += 1
        first_at = first_at or time.perf_counter()
        if token_id not in stops:
            sys.stdout.write(text_of(token_id))
            sys.stdout.flush()

    beam = config.num_beams > 1
    start = time.perf_counter()
    out = generate(model, input_ids, config=config, streamer=None if beam else stream, progress=beam)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if beam:
        for token_id in out[0].tolist():
            n_tokens += 1
            if token_id in stops:
                break
            sys.stdout.write(text_of(token_id))
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    rate = f"{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s"
    if first_at is not None and n_tokens > 1:
        rate += (f" (first token after {first_at - start:.2f} s, then "
                 f"{(n_tokens - 1) / max(time.perf_counter() - first_at, 1e-9):.1f} tokens/s)")
    _log(f"{rate}; prompt {len(ids)} tokens")
    if args.tp:
        parallel.finish()
    return 0


# ---------------------------------------------------------------- convert
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The conversion options, shared by `python -m stablelm convert` and convert_weights.py."""
    parser.add_argument("src", type=Path, help="the checkpoint directory to convert")
    parser.add_argument("dst", type=Path, help="the directory to write (must not exist, unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written floating tensors (default: "
                                                                 "as stored in SRC)")
    parser.add_argument("--quant", choices=sorted(QUANT_BITS), help="weight-only quantization of the linear layers "
                                                                     "(default: none)")
    parser.add_argument("--group-size", type=int,
                        help=f"int4 group size along the input dim (default {INT4_GROUP_SIZE}; int4 only)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="with --quant: quantize the causal LM's lm_head too (tied embeddings: a quantized copy "
                             "of the table is the head, the embedding stays float); default: the head stays float")
    parser.add_argument("--quantize-embedding", action="store_true",
                        help="with --quant int8|int4: quantize the embedding table too (its rounding error is added "
                             "to every token's input activations, for its bytes; untied causal LMs only); default: "
                             "the table stays float")
    parser.add_argument("--to-hf", action="store_true", help="convert a converted directory back to transformers")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an earlier conversion's output or an empty directory")


def run_convert(args, parser) -> int:
    """Convert SRC to DST as `args` (from add_convert_arguments) say."""
    args.src, args.dst = args.src.expanduser(), args.dst.expanduser()
    if not args.src.is_dir():
        parser.error(f"{args.src}: no such checkpoint directory" if not args.src.exists() else
                     f"{args.src} is not a directory (SRC is a checkpoint directory)")
    if not (args.src / "config.json").exists():
        parser.error(f"{args.src}: no config.json")
    if args.group_size is not None and args.quant != "int4":
        parser.error("--group-size applies to --quant int4 only (int8 has one scale per output row)")
    if args.to_hf:
        if args.quant or args.quantize_head or args.quantize_embedding:
            parser.error("--quant, --quantize-head and --quantize-embedding apply to HF -> project conversion only")
        export_hf_dir(args.src, args.dst, args.dtype, args.overwrite, progress=True)
    else:
        if args.quantize_head and args.quant is None:
            parser.error("--quantize-head needs --quant int8|int4|nf4 (it quantizes the lm_head as the other "
                         "linear layers)")
        if args.quantize_embedding and args.quant is None:
            parser.error("--quantize-embedding needs --quant int8|int4 (it quantizes the embedding table in the "
                         "linear layers' format)")
        if args.quantize_embedding and args.quant == "nf4":
            parser.error("--quantize-embedding takes --quant int8 or int4, not nf4 (nf4's double-quantized block "
                         "scales do not gather by row)")
        convert_hf_dir(args.src, args.dst, args.dtype, args.quant, args.group_size, args.overwrite, progress=True,
                       quantize_head=args.quantize_head, quantize_embedding=args.quantize_embedding)
    print(f"wrote {args.dst}")
    return 0


# ---------------------------------------------------------------- info
def _stored_dtypes(files: list[Path]) -> dict[str, int]:
    """Element count per stored dtype, read from safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    part = st.get_slice(name)
                    numel = 1
                    for n in part.get_shape():
                        numel *= n
                    counts[part.get_dtype()] = counts.get(part.get_dtype(), 0) + numel
        except BaseException as e:
            if not _rust_errors_too(e):
                raise
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return counts


def checkpoint_info(path: str | Path) -> dict:
    """A checkpoint directory's config, parameter count, stored dtypes and files, without loading the weights."""
    path = check_model_dir(path)
    cfg, quant = read_config(path)  # checked as load checks it
    meta = read_json(path / "config.json")
    kind = ("Hugging Face (convert it with `python -m stablelm convert`)" if is_hf_dir(path) else
            f"converted ({FORMAT} v{meta.get('version')})")
    files = weight_files(path)
    # The logical parameter count: quantized tensors are stored packed, with scales beside them.
    try:
        params = sum(torch.Size(s).numel() for s in project_shapes(cfg).values())
    except CheckpointError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e
    return {"path": str(path), "format": kind, "config": cfg.to_dict(), "parameters": params,
            "stored_dtypes": _stored_dtypes(files) or meta.get("torch_dtype") or meta.get("dtype"),
            "quantization": quant, "weight_files": [f.name for f in files],
            "weight_bytes": sum(f.stat().st_size for f in files),
            "tokenizer_files": sorted(p.name for p in path.iterdir()
                                      if p.name.startswith(("tokenizer", "special_tokens", "generation_config")))}


def cmd_info(args, parser) -> int:
    try:
        info = checkpoint_info(args.model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']}")
    print(f"parameters: {info['parameters']:,} ({human_count(info['parameters'])})")
    print(f"stored dtypes: {info['stored_dtypes']}")
    print(f"quantization: {info['quantization'] or 'none'}")
    print(f"weights: {', '.join(info['weight_files']) or 'none'} ({info['weight_bytes'] / 2**20:.1f} MiB)")
    print(f"tokenizer files: {', '.join(info['tokenizer_files']) or 'none'}")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stablelm", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout",
                       formatter_class=HelpFormatter)
    g.set_defaults(handler=cmd_generate, subparser=g)
    g.add_argument("--model", help="checkpoint directory (converted or Hugging Face); default: tiny random model")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--system", help="system message for --chat")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--min-new-tokens", type=int, default=0, help="stop ids are suppressed until this many")
    g.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy decoding (default: greedy, as transformers)")
    g.add_argument("--temperature", type=float,
                   help="> 0 samples at this temperature (implies --do-sample); 0 is greedy (default: greedy; "
                        "1.0 with --do-sample)")
    g.add_argument("--top-k", type=int, help=f"when sampling, keep the K most likely tokens; 0 = no top-k filter "
                                             f"(default: {DEFAULT_TOP_K}, as transformers)")
    g.add_argument("--top-p", type=float, help="when sampling, nucleus filter; 1.0 = none (default: 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search only")
    g.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    g.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA (default: graph)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree: run under `torchrun --nproc-per-node N` with N = "
                                          "the world size; each rank holds 1/N of the weights (README: Several GPUs)")
    g.add_argument("--no-check-finite", action="store_true",
                   help="skip the load-time check that every floating weight is finite (no NaN / inf)")

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint directory (or back, with --to-hf)",
                       formatter_class=HelpFormatter)
    add_convert_arguments(c)
    c.set_defaults(handler=run_convert, subparser=c)

    i = sub.add_parser("info", help="config, parameter count and dtypes of a checkpoint directory",
                       formatter_class=HelpFormatter)
    i.add_argument("--model", required=True, help="checkpoint directory (converted or Hugging Face)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(handler=cmd_info, subparser=i)

    k = sub.add_parser("check-op", help="check an implementation of an op: its contract, the whole model, speed",
                       description=oplab.__doc__, formatter_class=HelpFormatter)
    oplab.add_arguments(k)
    k.set_defaults(handler=lambda args, parser: oplab.run(args, ["stablelm", *args.argv]), subparser=k)
    return parser


SIGPIPE_STATUS = 128 + signal.SIGPIPE  # what a shell reports for a process killed by SIGPIPE (141)


def report_user_errors(handler, args, parser) -> int:
    """handler(args, parser), with a user error (a bad or unreadable checkpoint, a refused destination, a missing
    file, NaN/inf logits) printed as `error: ...` with exit status 2 instead of a traceback. A closed stdout
    (`| head`) ends it quietly with status 141, as Unix tools killed by SIGPIPE end."""
    try:
        status = handler(args, parser)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except (ValueError, OSError, NonFiniteLogitsError) as e:  # CheckpointError, TokenizerFileError: ValueErrors
        parser.error(str(e))


def _stdout_closed() -> int:
    # Python would report the unwritable buffered text once more at exit: point stdout at /dev/null first.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return SIGPIPE_STATUS


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # check-op re-executes itself with them under the Triton interpreter on the CPU
    return report_user_errors(args.handler, args, args.subparser)
