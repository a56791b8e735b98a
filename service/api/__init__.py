"""HTTP routes, one ``APIRouter`` per resource (jobs, results, models, operations, docs) and submission."""
