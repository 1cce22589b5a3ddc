"""The model process of the sealed evaluation: candidate code runs here and only here.

A program, not a library: the trusted evaluator (sealed_eval.py) runs this file's text with
`python -I -u -c SOURCE REQUESTS REPLIES SHARED PRELOAD`, in the box where there is one, which
hides this package; so it imports nothing of autoresearch's, only the standard library and
torch. It imports PRELOAD ahead, then reads one go line (train.py to import, the checkpoint, the
batch geometry B, T, V), loads the model and answers each request (`{"b": rows}`: that many
rows of input tokens are in the shared buffer) by writing float32 logits behind them and a line
`done`. It speaks on two inherited pipe fds, so what train.py prints (stdout, stderr: the
evaluator's log) is never read as an answer.

Its answers, one line each of at most REPLY_BYTES: `ready PARAMS`, `done`, `shape REASON`
(logits of the wrong shape: the evaluation is rejected), `fail STATUS REASON` (no_checkpoint or
error; it then exits). What it does not guarantee: anything about the logits; the trusted side
checks them and runs the causality probe.
"""

import json
import mmap
import os
import sys

REPLY_BYTES = 2000  # characters of an answer line; sealed_eval reads at most 2048 bytes


def _say(replies: int, text: str) -> None:
    os.write(replies, (text.replace("\n", " ")[:REPLY_BYTES] + "\n").encode())


def _preload(names: list[str]) -> None:
    for name in names:
        try:
            __import__(name)
        except Exception:  # train.py's own import will say what is wrong
            pass


def serve(argv: list[str]) -> None:
    """Serve one model: load it on the go, then answer requests until the pipe closes."""
    requests, replies, shared = (int(a) for a in argv[:3])
    _preload(json.loads(argv[3]))
    inbox = os.fdopen(requests, "rb", buffering=0)
    line = inbox.readline()
    if not line.strip():
        os._exit(0)
    go = json.loads(line)
    os.chdir(go["workdir"])
    sys.path[:0] = [os.path.dirname(go["train"]), go["workdir"]]
    import importlib.util

    import torch

    B, T, V = go["B"], go["T"], go["V"]
    try:
        spec = importlib.util.spec_from_file_location("train", go["train"])
        train = importlib.util.module_from_spec(spec)
        sys.modules["train"] = train
        spec.loader.exec_module(train)
    except BaseException as e:  # candidate code: whatever it raises is its failure
        _say(replies, f"fail error importing train.py failed: {type(e).__name__}: {e}")
        os._exit(0)
    if not callable(getattr(train, "load_model", None)):
        _say(
            replies,
            "fail no_checkpoint train.py defines no load_model(path, device): the harness "
            "cannot rebuild the model",
        )
        os._exit(0)
    device = torch.device(go["device"])
    try:
        model = train.load_model(go["checkpoint"], device)
        params = sum(p.numel() for p in model.parameters())
        model.eval()
    except BaseException as e:
        _say(
            replies,
            f"fail no_checkpoint load_model could not load the checkpoint: {type(e).__name__}: {e}",
        )
        os._exit(0)
    buffer = mmap.mmap(shared, B * T * 8 + B * T * V * 4)
    inputs = torch.frombuffer(buffer, dtype=torch.int64, count=B * T)
    outputs = torch.frombuffer(buffer, dtype=torch.float32, count=B * T * V, offset=B * T * 8)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    _say(replies, f"ready {params}")
    while True:
        line = inbox.readline()
        if not line.strip():
            os._exit(0)
        b = json.loads(line)["b"]
        try:
            with torch.no_grad(), autocast:
                logits = model(inputs[: b * T].view(b, T).to(device))
            if tuple(logits.shape) != (b, T, V):
                _say(
                    replies,
                    f"shape model(x) must return logits of shape ({b}, {T}, {V}), got "
                    f"{tuple(logits.shape)}",
                )
                continue
            outputs[: b * T * V].view(b, T, V).copy_(logits.detach().float())
        except BaseException as e:
            _say(replies, f"fail error the model's forward failed: {type(e).__name__}: {e}")
            os._exit(0)
        _say(replies, "done")


if __name__ == "__main__":
    serve(sys.argv[1:])
