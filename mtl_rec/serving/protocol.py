"""The Open Inference Protocol v2 (KServe v2 REST) for the score function, with Triton's binary tensor extension.

Inputs: `user_id` and `item_id`, datatype BYTES (strings) or INT64 (INT32 too), shape [N] or [N, 1] (`user_id` may
also be a single element, broadcast to every item), and, optionally, the model's request-time context features by
name (BYTES for strings and lists joined by the feature's delimiter, INT64/INT32, FP32/FP64 for numbers; one element
or one per item; missing ones are unknown). Outputs: one FP32 tensor per task, FP32 `score` (the fused ranking score)
and BOOL `user_cold_start` / `item_cold_start`, shaped like `item_id`; the response parameter `unknown_values`
names the context inputs that held values the model does not know (they used the out-of-vocabulary row). Fusion
weights can be overridden with request parameters `fusion_weight_<task>`.

Tensor data comes as JSON arrays or, with the binary extension that tritonclient uses by default, after the JSON
header (its length in the `Inference-Header-Content-Length` header), each input's bytes sized by its
`parameters.binary_data_size`; outputs are sent the same way when asked (`binary_data` per output, or the request
parameter `binary_data_output`).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import numpy as np
import orjson

from mtl_rec import encoding
from mtl_rec.serving.loader import MAX_ID_CHARS, ExportedModel
from mtl_rec.serving.validation import (FLOAT32_MAX, MAX_TEXT_CHARS, BadRequest, check_float32, is_finite, parse_json,
                                        parse_weights)

INPUT_DATATYPES = {'BYTES': None, 'INT64': '<i8', 'INT32': '<i4', 'FP32': '<f4', 'FP64': '<f8'}
ID_INPUTS = ('user_id', 'item_id')
# Which datatypes an input may come as, by the raw type its encoding rule reads.
ACCEPTED = {'id': ('BYTES', 'INT64', 'INT32'), 'str': ('BYTES',), 'list[str]': ('BYTES',), 'int': ('INT64', 'INT32'),
            'float': ('FP32', 'FP64', 'INT64', 'INT32')}
METADATA_DATATYPE = {'id': 'BYTES', 'str': 'BYTES', 'list[str]': 'BYTES', 'int': 'INT64', 'float': 'FP32'}
HEADER_LENGTH = 'Inference-Header-Content-Length'
WEIGHT_PARAM_PREFIX = 'fusion_weight_'


def output_names(model: ExportedModel) -> list[str]:
  return [*model.task_names, 'score', 'user_cold_start', 'item_cold_start']


def model_metadata(model: ExportedModel) -> dict[str, Any]:
  """GET /v2/models/{name}: inputs and outputs with variable batch size (-1)."""
  return {
      'name': model.name,
      'versions': [str(model.version)],
      'platform': 'jax_export',
      'inputs': [{'name': 'user_id', 'datatype': 'BYTES', 'shape': [-1]},
                 {'name': 'item_id', 'datatype': 'BYTES', 'shape': [-1]},
                 *[{'name': f, 'datatype': METADATA_DATATYPE[rule['raw_type']], 'shape': [-1], 'optional': True}
                   for f, (_, rule) in model.context_fields.items()]],
      'outputs': [{'name': n, 'datatype': 'BOOL' if n.endswith('cold_start') else 'FP32', 'shape': [-1]}
                  for n in output_names(model)],
  }


def model_config(model: ExportedModel, max_rows: int) -> dict[str, Any]:
  """GET /v2/models/{name}/config (Triton's extension; tritonclient's get_model_config)."""
  meta = model_metadata(model)
  dims = lambda ts: [{'name': t['name'], 'data_type': f'TYPE_{"STRING" if t["datatype"] == "BYTES" else t["datatype"]}',
                      'dims': [-1]} for t in ts]
  return {'name': model.name, 'platform': meta['platform'], 'max_batch_size': 0, 'input': dims(meta['inputs']),
          'output': dims(meta['outputs']), 'parameters': {'max_rows': {'string_value': str(max_rows)}}}


@dataclasses.dataclass
class InferRequest:
  id: str | None
  user_ids: list[Any]  # one per row, or a single one broadcast
  item_ids: list[Any]
  shape: list[int]  # item_id's shape: the outputs' shape
  outputs: list[tuple[str, bool]]  # (name, binary)
  weights: np.ndarray  # [T]
  context: dict[str, list[Any]]  # context field -> values (one, or one per item)


def _flatten(data: Any, shape: list[int], where: str) -> list[Any]:
  """A tensor's JSON data, flat (row-major, as the spec allows) or nested exactly as its shape."""
  if not isinstance(data, list):
    raise BadRequest(f'{where}.data must be an array, got {type(data).__name__}')
  if len(shape) <= 1 or not any(isinstance(x, list) for x in data):
    return data
  if len(data) != shape[0] or not all(isinstance(x, list) and len(x) == shape[1] for x in data):
    raise BadRequest(f'{where}.data is nested otherwise than its shape {shape}: send it flat, or as {shape[0]} '
                     f'arrays of {shape[1]}')
  return [v for x in data for v in x]


def _decode_bytes_tensor(buf: bytes, n: int, where: str) -> list[str]:
  out, off = [], 0
  while off < len(buf):
    if off + 4 > len(buf):
      raise BadRequest(f'{where}: truncated BYTES element length at byte {off}')
    (length,) = struct.unpack_from('<I', buf, off)
    off += 4
    if off + length > len(buf):
      raise BadRequest(f'{where}: BYTES element of {length} bytes runs past the end of its binary data')
    try:
      out.append(buf[off:off + length].decode('utf-8'))
    except UnicodeDecodeError:
      raise BadRequest(f'{where}: element {len(out)} is not valid UTF-8') from None
    off += length
    if len(out) > n:
      break
  if len(out) != n:
    raise BadRequest(f'{where}: binary data holds {len(out)} BYTES elements, the shape says {n}')
  return out


def _parse_input(t: Any, binary: memoryview, offset: int, max_rows: int, raw_types: dict[str, str],
                 max_chars: dict[str, int]) -> tuple[str, list[Any], list[int], int]:
  """One input tensor -> (name, flat values, shape, new binary offset); `raw_types` names the inputs and the raw
  type each one's encoding reads; `max_chars` the longest string each takes where not MAX_ID_CHARS."""
  if not isinstance(t, dict):
    raise BadRequest(f'each entry of inputs must be an object, got {type(t).__name__}')
  name = t.get('name')
  if not isinstance(name, str):
    raise BadRequest(f'each input needs a "name" string ({", ".join(raw_types)}), got {type(name).__name__}')
  where = f'input {name!r}'
  if name not in raw_types:
    raise BadRequest(f'unknown input {name!r}: this model takes {", ".join(raw_types)}')
  unknown = sorted(set(t) - {'name', 'shape', 'datatype', 'parameters', 'data'})
  if unknown:
    raise BadRequest(f'{where}: unknown field {unknown[0]!r}')
  datatype = t.get('datatype')
  accepted = ACCEPTED[raw_types[name]]
  if datatype not in accepted:
    raise BadRequest(f'{where}: datatype {datatype!r} is not supported; use {" or ".join(accepted)}')
  shape = t.get('shape')
  if (not isinstance(shape, list) or not 1 <= len(shape) <= 2 or
      not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or
      len(shape) == 2 and shape[1] != 1):
    raise BadRequest(f'{where}: shape must be [N] or [N, 1] with non-negative integers, got {shape!r}')
  n = math.prod(shape)
  if n == 0:
    raise BadRequest(f'{where}: shape {shape} is empty; send at least one id')
  if n > max_rows:
    raise BadRequest(f'{where}: {n} elements exceed the limit of {max_rows} rows per request')
  params = t.get('parameters', {})
  if not isinstance(params, dict):
    raise BadRequest(f'{where}: parameters must be an object')
  size = params.get('binary_data_size')
  if size is not None:
    if 'data' in t:
      raise BadRequest(f'{where}: give either data or parameters.binary_data_size, not both')
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
      raise BadRequest(f'{where}: binary_data_size must be a non-negative integer')
    if offset + size > len(binary):
      raise BadRequest(f'{where}: binary_data_size={size} runs past the end of the body '
                       f'({len(binary) - offset} bytes left)')
    buf = bytes(binary[offset:offset + size])
    offset += size
    if datatype == 'BYTES':
      values = _decode_bytes_tensor(buf, n, where)
    else:
      dtype = np.dtype(INPUT_DATATYPES[datatype])
      if size != n * dtype.itemsize:
        raise BadRequest(f'{where}: {size} bytes of binary data for {n} {datatype} elements '
                         f'(need {n * dtype.itemsize})')
      values = np.frombuffer(buf, dtype).tolist()
  else:
    if 'data' not in t:
      raise BadRequest(f'{where}: data is missing')
    values = _flatten(t['data'], shape, where)
    if len(values) != n:
      raise BadRequest(f'{where}: data has {len(values)} elements, shape {shape} needs {n}')
    if datatype == 'BYTES':
      if not all(isinstance(x, str) for x in values):
        bad = next(x for x in values if not isinstance(x, str))
        raise BadRequest(f'{where}: BYTES data must be strings, got {bad!r}')
    elif datatype.startswith('FP'):
      for x in values:
        if not is_finite(x):  # a number (not a bool) finite as a float: a 400-digit integer is not
          raise BadRequest(f'{where}: {datatype} data must be finite numbers, got {x!r}')
        if datatype == 'FP32' and abs(x) > FLOAT32_MAX:
          raise BadRequest(f'{where}: FP32 data must be float32 numbers (at most {FLOAT32_MAX:.4g} in size), '
                           f'got {x!r}')
    else:
      lo, hi = (-(2**63), 2**63) if datatype == 'INT64' else (-(2**31), 2**31)
      for x in values:
        if not isinstance(x, int) or isinstance(x, bool) or not lo <= x < hi:
          raise BadRequest(f'{where}: {datatype} data must be integers in range, got {x!r}')
  if datatype.startswith('FP') and not all(math.isfinite(x) for x in values):
    raise BadRequest(f'{where}: {datatype} data must be finite numbers')
  if datatype == 'BYTES':
    limit = max_chars.get(name, MAX_ID_CHARS)
    for x in values:
      if (name in ID_INPUTS and not x) or len(x) > limit:
        raise BadRequest(f'{where}: values are {1 if name in ID_INPUTS else 0} to {limit} characters, got '
                         f'{x[:40]!r}{f" ({len(x)} characters)" if len(x) > limit else ""}')
  return name, values, shape, offset


def parse_infer(body: bytes, header_length: str | None, model: ExportedModel, max_rows: int) -> InferRequest:
  """POST /v2/models/{name}/infer body (+ binary data) -> InferRequest, or BadRequest."""
  binary = memoryview(b'')
  if header_length is not None:
    try:
      length = int(header_length)
    except ValueError:
      raise BadRequest(f'{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}') from None
    if not 0 < length <= len(body):
      raise BadRequest(f'{HEADER_LENGTH}={length} is outside the body (length {len(body)})')
    binary = memoryview(body)[length:]
    body = body[:length]
  try:
    req = parse_json(body)
  except BadRequest as e:
    if header_length is None and b'"binary_data_size"' in body:  # raw tensor bytes after the JSON: say why
      raise BadRequest(f'{e.message}: a body with binary tensor data needs the {HEADER_LENGTH} header (the length '
                       'of its JSON part)') from None
    raise
  if not isinstance(req, dict):
    raise BadRequest('the inference request must be a JSON object with "inputs"')
  unknown = sorted(set(req) - {'id', 'parameters', 'inputs', 'outputs'})
  if unknown:
    raise BadRequest(f'unknown field {unknown[0]!r} in the inference request')
  request_id = req.get('id')
  if request_id is not None and not isinstance(request_id, str):
    raise BadRequest(f'id must be a string, got {type(request_id).__name__}')
  params = req.get('parameters', {})
  if not isinstance(params, dict):
    raise BadRequest('parameters must be an object')
  for key, value in params.items():
    if not isinstance(value, (str, int, float, bool)):
      raise BadRequest(f'parameter {key!r} must be a string, number or boolean')
    # Other parameters (tritonclient's, a gateway's) pass; a misspelt weight would silently score with the defaults.
    if key.lower().startswith('fusion') and not key.startswith(WEIGHT_PARAM_PREFIX):
      raise BadRequest(f'unknown parameter {key!r}: a task\'s fusion weight is {WEIGHT_PARAM_PREFIX}<task>, '
                       f'tasks {", ".join(model.task_names)}')
  weights = parse_weights({k[len(WEIGHT_PARAM_PREFIX):]: v for k, v in params.items()
                           if k.startswith(WEIGHT_PARAM_PREFIX)}, model, 'parameters.fusion_weight_<task>')
  binary_default = params.get('binary_data_output', False)
  if not isinstance(binary_default, bool):
    raise BadRequest('parameter binary_data_output must be a boolean')

  inputs = req.get('inputs')
  if not isinstance(inputs, list) or not inputs:
    raise BadRequest('inputs must be a non-empty array with user_id and item_id')
  got: dict[str, tuple[list[Any], list[int]]] = {}
  offset = 0
  raw_types = {'user_id': 'id', 'item_id': 'id', **{f: r['raw_type'] for f, (_, r) in model.context_fields.items()}}
  # a text context input (a search query) takes as much as /v1 takes: MAX_TEXT_CHARS
  max_chars = {f: MAX_TEXT_CHARS for f, (_, r) in model.context_fields.items() if r['kind'] == 'text'}
  for t in inputs:
    name, values, shape, offset = _parse_input(t, binary, offset, max_rows, raw_types, max_chars)
    if name in got:
      raise BadRequest(f'input {name!r} is given twice')
    got[name] = (values, shape)
  if offset != len(binary):
    raise BadRequest(f'{len(binary) - offset} bytes of binary data are not claimed by any input\'s '
                     'binary_data_size')
  for name in ('user_id', 'item_id'):
    if name not in got:
      raise BadRequest(f'input {name!r} is missing; this model takes user_id and item_id')
  users, _ = got['user_id']
  items, shape = got['item_id']
  if len(users) not in (1, len(items)):
    raise BadRequest(f'user_id has {len(users)} elements and item_id {len(items)}: give one user_id per item_id, '
                     'or a single user_id for all')
  context = {name: values for name, (values, _) in got.items() if name not in ID_INPUTS}
  for name, values in context.items():
    if len(values) not in (1, len(items)):
      raise BadRequest(f'{name} has {len(values)} elements and item_id {len(items)}: give one per item_id, or a '
                       'single one for all')

  names = output_names(model)
  outputs = []
  requested = req.get('outputs')
  if requested is None:
    outputs = [(n, binary_default) for n in names]
  else:
    if not isinstance(requested, list) or not requested:
      raise BadRequest('outputs must be a non-empty array of {"name": ...} (or absent for all outputs)')
    for o in requested:
      if not isinstance(o, dict):
        raise BadRequest(f'each entry of outputs must be an object {{"name": ...}}, got {o!r:.40}; outputs: '
                         f'{", ".join(names)}')
      unknown = sorted(set(o) - {'name', 'parameters'})
      if unknown:
        raise BadRequest(f'output {o.get("name")!r}: unknown field {unknown[0]!r}')
      if o.get('name') not in names:
        raise BadRequest(f'unknown output {o.get("name") if isinstance(o, dict) else o!r}; outputs: '
                         f'{", ".join(names)}')
      if any(o['name'] == n for n, _ in outputs):
        raise BadRequest(f'output {o["name"]!r} is requested twice')
      p = o.get('parameters', {})
      if not isinstance(p, dict):
        raise BadRequest(f'output {o["name"]!r}: parameters must be an object')
      b = p.get('binary_data', binary_default)
      if not isinstance(b, bool):
        raise BadRequest(f'output {o["name"]!r}: binary_data must be a boolean')
      if p.get('classification'):
        raise BadRequest('the classification extension is not supported')
      outputs.append((o['name'], b))
  return InferRequest(request_id, users, items, shape, outputs, weights, context)


def encode_context(req: InferRequest, model: ExportedModel, n: int) -> tuple[dict[str, np.ndarray], list[str]]:
  """The context inputs [n] of a request (missing ones unknown), and the inputs holding values the model does not
  know (they use the out-of-vocabulary row)."""
  out = {k: np.broadcast_to(v, (n,) + np.shape(v)) for k, v in model.no_context.items()}
  unknown = []
  for field, values in req.context.items():
    name, rule = model.context_fields[field]
    if rule['raw_type'] == 'float':
      check_float32(rule, values, f'input {field!r}')
    encoded = encoding.encode(rule, values, model.vocabs)
    out[name] = np.broadcast_to(encoded, (n,) + encoded.shape[1:]) if len(values) == 1 else encoded
    if any(encoding.unknown(rule, v, model.vocabs) for v in set(values)):
      unknown.append(field)
  return out, unknown


def encode_response(model: ExportedModel, req: InferRequest, values: dict[str, np.ndarray],
                    unknown: list[str] = ()) -> tuple[bytes, dict]:
  """(body, headers) of an inference response; binary outputs follow the JSON header."""
  outs, blobs = [], []
  for name, binary in req.outputs:
    arr = values[name]
    datatype = 'BOOL' if arr.dtype == np.bool_ else 'FP32'
    entry = {'name': name, 'datatype': datatype, 'shape': req.shape}
    if binary:
      blob = arr.astype(np.bool_ if datatype == 'BOOL' else '<f4').tobytes()
      entry['parameters'] = {'binary_data_size': len(blob)}
      blobs.append(blob)
    else:
      entry['data'] = arr  # orjson writes numpy arrays (float32 in shortest form)
    outs.append(entry)
  resp = {'model_name': model.name, 'model_version': str(model.version), 'outputs': outs}
  if req.id is not None:
    resp['id'] = req.id
  if unknown:
    resp['parameters'] = {'unknown_values': ','.join(unknown)}
  header = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
  if not blobs:
    return header, {'Content-Type': 'application/json'}
  return header + b''.join(blobs), {'Content-Type': 'application/octet-stream', HEADER_LENGTH: str(len(header))}
