"""Serving of an export directory (see mtl_rec/export.py): loading, dynamic batching, HTTP endpoints, protocols.

Nothing here imports mtl_rec's model, feature or training code: the export directory is the whole contract.

  loader.py      ExportedModel: manifest, artifacts, parameters, tables, raw value -> feature row encoding
  batching.py    Batcher: concurrent requests merged into one call of the compiled function
  validation.py  request bodies of /v1/score and /v1/recommend -> typed work, or a 4xx naming the problem
  protocol.py    the Open Inference Protocol v2 (KServe v2 REST) with Triton's binary tensor extension
  metrics.py     Prometheus counters and histograms, text exposition format
  app.py         the aiohttp application and `serve()`
  benchmark.py   latency / throughput of the exported function and of the HTTP server
"""
