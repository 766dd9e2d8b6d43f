"""`npgpt serve`: the OpenAI-compatible server (npgpt/serve.py)."""
from __future__ import annotations

import click

from .main import threads_option


@click.command()
@click.option("--model", "model_dir", default=None, type=click.Path(), help="Checkpoint dir (default: the shipped model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False), help="Read the key from this file.")
@click.option("--parallel", default=8, show_default=True, type=click.IntRange(min=1),
              help="Sequences generated at once, in one batch (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Sequences that may wait for a slot; a request beyond that gets 429.")
@threads_option
def serve(model_dir, host, port, api_key, api_key_file, parallel, max_queue):
    """Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models, streaming),
    with /health, /metrics and a chat page at /. Needs the extra: pip install 'npgpt[serve]'."""
    from npgpt.assets import default_model_dir
    from npgpt.serve import read_api_key, serve as run
    run(model_dir or default_model_dir(), host, port, api_key=read_api_key(api_key, api_key_file), parallel=parallel,
        max_queue=max_queue)
