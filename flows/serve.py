"""Serve a fine-tuned model over HTTP with Ray Serve.

    python flows/serve.py --model runs/finetune/latest/models/<row>/sst2            # http://127.0.0.1:8000
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"texts": ["a gripping film"]}'
    python flows/serve.py --model s3://bucket/models/sst2 --replicas 1 4 --host 0.0.0.0 --port 8080

POST /predict takes {"texts": [...]}, {"pairs": [[a, b], ...]} or {"question": ..., "context": ...}
and answers {"predictions": [...], "model"}, one prediction per input, shaped by the model's kind
(read from its config.json): {"label", "score", "scores"} for classification, regression and
question answering; {"labels", "scores"} for multilabel (the labels over the config's threshold,
highest first, and every label's sigmoid score); {"entities": [{"entity_group", "score", "word",
"start", "end"}]} for token classification (character offsets into the text, grouped as
transformers' token-classification pipeline with aggregation_strategy="simple"; texts only).
Multiple-choice models are refused at start-up. GET /healthz; GET /stats
(batch sizes seen); GET /docs and /openapi.json describe it. Requests that arrive together are
batched into one forward pass (--max-batch-size, --batch-wait-timeout-s; --no-batching to turn
it off). --replicas N runs N replicas, --replicas MIN MAX autoscales between them. The service
listens on 127.0.0.1 unless --host says otherwise. For a cluster, `serve deploy
clusters/serve/predict.yaml` deploys the same application from a config file.
Inside `ray job submit` the script joins the job's cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.serve.settings import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="bertray", help="Serve application name")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], metavar="N",
                        help="N replicas, or MIN MAX to autoscale on ongoing requests")
    parser.add_argument("--target-ongoing-requests", type=float, default=16,
                        help="autoscaling target of ongoing requests per replica")
    parser.add_argument("--max-ongoing-requests", type=int, default=64,
                        help="requests a replica holds at once (at least --max-batch-size to fill batches)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    add_config_options(parser, ServeSettings, required=("model",))
    return parser


def deployment_options(args: argparse.Namespace) -> dict:
    options = {"max_ongoing_requests": args.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica}}
    if len(args.replicas) == 1:
        options["num_replicas"] = args.replicas[0]
    elif len(args.replicas) == 2:
        options["autoscaling_config"] = {"min_replicas": args.replicas[0], "max_replicas": args.replicas[1],
                                         "target_ongoing_requests": args.target_ongoing_requests}
    else:
        raise SystemExit("error: --replicas takes N or MIN MAX")
    return options


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bertray.cli import config_from_args, start_ray
    from bertray.errors import BertrayError
    from bertray.serve.settings import ServeSettings
    from bertray.storage import absolute_url

    try:
        settings = config_from_args(ServeSettings, args)
        settings = dataclasses.replace(settings, model=absolute_url(settings.model))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ray import serve

    from bertray.serve.app import Predictor

    start_ray(args.address, args.num_cpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = Predictor.options(**deployment_options(args)).bind(settings.to_args())
    serve.run(app, name=args.name, route_prefix="/")
    print(f"serving {settings.model} on http://{args.host}:{args.port} (POST /predict, GET /healthz, /stats, /docs); "
          f"Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
