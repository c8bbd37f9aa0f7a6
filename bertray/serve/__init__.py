"""An HTTP service for a fine-tuned model on Ray Serve: `POST /predict`, `GET /healthz`,
`GET /stats`, the OpenAPI schema at `/openapi.json` (`settings` what it is given, `api` the
HTTP surface, `app` the Serve deployment and the builder `serve deploy` imports). Needs the
`serve` extra (`pip install bertray[serve]`)."""
