"""HTTP service of ttaseg: job submission, status, results and operations endpoints."""
