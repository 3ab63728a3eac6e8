"""`hpcdl export`: a checkpoint's model weights alone, for tools outside hpcdl.

`.safetensors` follows the format's specification, written here (the safetensors package is not a dependency):
8 bytes, the header's length N as a little-endian uint64; N bytes of JSON, {name: {"dtype": "F32", "shape": [..],
"data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}, padded with spaces to a multiple of 8; then every
tensor's raw little-endian bytes, row-major, at its offsets counted from the end of the header. `.pt` and `.pth`
get a weights-only `torch.save` of the state dict: `model.load_state_dict(torch.load(path, weights_only=True))`.
Any other suffix is refused before anything is loaded: a file named for a format this does not write (`.onnx`)
would mislead whoever opens it.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import torch

from hpcdl import checkpoint, outputs
from hpcdl.errors import HpcdlError

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
HEADER_LENGTH = struct.Struct("<Q")
SAFETENSORS = ".safetensors"
WRITERS = (SAFETENSORS, ".pt", ".pth")  # the suffixes `export` writes, said by WRITTEN
WRITTEN = ".safetensors (the safetensors format) or .pt / .pth (a weights-only torch state dict)"


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """`tensors` (and string `metadata`) in the safetensors format."""
    header: dict[str, object] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise HpcdlError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot hold; export to .pt")
        blob = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-byte aligned
    return HEADER_LENGTH.pack(len(text)) + text + b"".join(blobs)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a .safetensors file, each checked against the header."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_LENGTH.size:
        raise HpcdlError(f"{path} is not a safetensors file (shorter than its header length)")
    (length,) = HEADER_LENGTH.unpack_from(data)
    body = memoryview(data)[HEADER_LENGTH.size + length :]
    try:
        header = json.loads(data[HEADER_LENGTH.size : HEADER_LENGTH.size + length])
    except ValueError as exc:
        raise HpcdlError(f"{path} is not a safetensors file (header: {exc})") from None
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype, shape = TORCH_DTYPES[entry["dtype"]], entry["shape"]
        expected = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != expected:
            raise HpcdlError(f"{path}: tensor {name}'s bytes {begin}:{end} do not hold {entry['dtype']} {shape}")
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata


def check_out(out: Path, overwrite: bool) -> None:
    """`out` names a format this writes and a place it can write (no file there unless `overwrite`)."""
    if out.suffix not in WRITERS:
        found = f"not {out.suffix}" if out.suffix else "and this name has no suffix"
        raise HpcdlError(f"--out {out}: export writes {WRITTEN}, {found}; end the file's name with one of these")
    outputs.check_new_file("--out", out, overwrite)


def export(target: str, out: str | Path, overwrite: bool = False) -> tuple[Path, int]:
    """Write the model weights of a checkpoint (or a run folder's newest valid one) to `out`; (path, tensors).

    `out` is checked before anything is loaded; an existing one is replaced (atomically) only with `overwrite`.
    """
    out = Path(out)
    check_out(out, overwrite)
    notes: list[str] = []
    path = checkpoint.locate(target, notes)
    for note in notes:
        print(f"hpcdl: {note}")
    state = checkpoint.load(path)
    weights = {name: tensor for name, tensor in state["model"].items() if torch.is_tensor(tensor)}
    if out.suffix == SAFETENSORS:
        about = {"format": "pt", "checkpoint": str(path), "config": json.dumps(state.get("config", {}))}
        data = safetensors_bytes(weights, about)
    else:
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        data = buffer.getvalue()
    try:
        checkpoint.write_atomically(out, data)
    except OSError as exc:
        raise HpcdlError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, len(weights)
