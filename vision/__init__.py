"""Image side of the report-generation model: Swin encoder, projector, report model, data and metrics."""
