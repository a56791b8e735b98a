"""HTTP routes, one module and one ``APIRouter`` per resource: jobs, results, models and operations."""
