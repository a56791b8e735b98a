"""``--mode federated``: sites that keep their scans and share only weights, by FedAvg on Flower (``flwr``).

MAPSeg's federated setting (FedAvg: McMahan et al., AISTATS 2017). :func:`train_federated` starts a server
process and one client process per site on this machine; each client loads only its own site's scans, and only
network weights cross a process boundary. Every round each site starts from the global weights and runs
``local_steps``: masked-autoencoder steps in the first ``mae_rounds`` at every site, then supervised steps at the
labelled (source) site and the masked pseudo-labelling of :mod:`models.mpl` at the unlabelled sites, whose
teacher starts every round from the global weights. The server averages the sites' weights by their numbers of
scans, saves the global weights after every round (a killed run resumes from the last finished round) and
records the bytes exchanged per round (weights down to the sites + up from them).

Run as ``python -m trainer.federated server WORK`` or ``python -m trainer.federated client WORK SITE``; the
settings are in ``WORK/federated.json``, written by :func:`train_federated`.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from trainer.config import FederatedConfig, TrainConfig

if TYPE_CHECKING:
    from trainer.train import TrainRun

SPEC, GLOBAL, HISTORY = "federated.json", "global.pt", "history.json"
MAE, SEGMENTATION = "mae", "segmentation"
RULE = "scans never left their site's process; only network weights were exchanged"
ROOT = Path(__file__).resolve().parents[1]
RoundProgress = Callable[[int, str], None]  # (rounds done, short status)


class Site(BaseModel):
    """A site's scans: a folder, CSV or prepared ``.npz``; labelled sites also name their label maps."""

    name: str
    images: str
    labels: str | None = None
    labelled: bool = False


class Spec(BaseModel):
    """What the server and every client read from ``WORK/federated.json``."""

    sites: list[Site]
    labels: dict[int, str]
    cfg: TrainConfig
    fed: FederatedConfig
    address: str
    device: str = "cpu"
    init_weights: str | None = None
    threads: int = 1

    @property
    def total_rounds(self) -> int:
        return self.fed.mae_rounds + self.fed.rounds


def round_phase(rnd: int, fed: FederatedConfig) -> str:
    """What round ``rnd`` (counted from 1) trains: ``mae`` or ``segmentation``."""
    return MAE if rnd <= fed.mae_rounds else SEGMENTATION


def _network(spec: Spec):
    from models.network import GlobalLocalUNet

    return GlobalLocalUNet(spec.cfg.network.model_copy(update={"out_channels": len(spec.labels)}))


def _arrays(net) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in net.state_dict().values()]


def _load_arrays(net, arrays: Sequence[np.ndarray]) -> None:
    import torch

    keys = list(net.state_dict())
    net.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})


def run_server(work: Path) -> None:
    """FedAvg rounds until ``total_rounds`` are done, resuming from ``WORK/global.pt``."""
    import flwr
    import torch
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    from trainer.train import load_initial_weights, save_checkpoint

    spec = Spec.model_validate_json((work / SPEC).read_text())
    torch.manual_seed(spec.cfg.seed)
    net = _network(spec)
    saved = torch.load(work / GLOBAL, weights_only=False) if (work / GLOBAL).exists() else {}
    if saved:
        net.load_state_dict(saved["net"])
    else:
        load_initial_weights(net, spec.init_weights)
    done, history = saved.get("round", 0), saved.get("history", [])
    elapsed, started = saved.get("seconds", 0.0), time.perf_counter()
    n_sites = len(spec.sites)

    class Strategy(flwr.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            self.bytes_down = sum(len(t) for t in parameters.tensors) * n_sites
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {done + server_round}: {len(failures)} site(s) failed")
            aggregated, metrics = super().aggregate_fit(server_round, results, failures)
            rnd = done + server_round
            _load_arrays(net, parameters_to_ndarrays(aggregated))
            up = sum(len(t) for _, r in results for t in r.parameters.tensors)
            sites = {
                r.metrics["site"]: {k: v for k, v in r.metrics.items() if k != "site"} for _, r in results
            }
            seconds = elapsed + time.perf_counter() - started
            history.append(
                {
                    "round": rnd,
                    "phase": round_phase(rnd, spec.fed),
                    "bytes_down": self.bytes_down,
                    "bytes_up": up,
                    "seconds": round(seconds, 1),
                    "sites": sites,
                }
            )
            save_checkpoint(
                work / GLOBAL, {"net": net.state_dict(), "round": rnd, "history": history, "seconds": seconds}
            )
            (work / HISTORY).write_text(json.dumps(history, indent=2))
            return aggregated, metrics

    strategy = Strategy(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n_sites,
        min_evaluate_clients=0,
        min_available_clients=n_sites,
        initial_parameters=ndarrays_to_parameters(_arrays(net)),
        on_fit_config_fn=lambda server_round: {"round": done + server_round},
    )
    flwr.server.start_server(
        server_address=spec.address,
        config=flwr.server.ServerConfig(num_rounds=spec.total_rounds - done),
        strategy=strategy,
    )


def run_client(work: Path, site_index: int) -> None:
    """One site: loads only its own scans and trains the global weights locally every round."""
    import flwr
    import torch
    from monai.losses import DiceCELoss

    from models.mpl import ema_update, mpl_pseudo_labels, mpl_student_loss
    from trainer.data import load_cases, source_volume_ranges
    from trainer.train import mae_loss, supervised_loss, view_batches
    from trainer.uda import unlabelled

    spec = Spec.model_validate_json((work / SPEC).read_text())
    site, cfg, fed = spec.sites[site_index], spec.cfg, spec.fed
    torch.set_num_threads(spec.threads)
    names = spec.labels if site.labelled else None
    labels = Path(site.labels) if site.labelled and site.labels else None
    cases = load_cases(Path(site.images), labels, names, cfg.target_spacing, cfg.normalisation)
    cases = cases if site.labelled else unlabelled(cases)
    facts = {"site": site.name, "scans": len(cases), "labelled": site.labelled, "pid": os.getpid()}
    if site.labelled:
        facts |= {
            "cases": json.dumps([c.case for c in cases]),
            "label_volumes_ml": json.dumps(source_volume_ranges(cases, spec.labels)),
        }
    net = _network(spec).to(spec.device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def local_round(rnd: int) -> tuple[int, float]:
        """Run this site's steps of round ``rnd``; returns (weight of its update, mean loss)."""
        phase = round_phase(rnd, fed)
        if phase == SEGMENTATION and not site.labelled and rnd <= fed.mae_rounds + fed.warmup_rounds:
            return 0, float("nan")  # pseudo-labels wait for a teacher that has seen labels
        start = (rnd - 1) * fed.local_steps
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + rnd * 101 + site_index)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if phase == MAE or site.labelled:
            batches = view_batches(cases, cfg, labelled=phase != MAE, start_step=start)
        else:
            target_cfg = cfg.model_copy(
                update={"batch_size": fed.target_batch_size, "augment": False, "seed": cfg.seed + 1}
            )
            batches = view_batches(cases, target_cfg, labelled=False, start_step=start)
            teacher = copy.deepcopy(net).eval()
        net.train()
        losses = []
        for _ in range(fed.local_steps):
            v = next(batches).to(spec.device)
            if phase == MAE:
                loss = mae_loss(net, v, cfg, gen)
            elif site.labelled:
                loss = supervised_loss(net, v, cfg, loss_fn)
            else:
                loss = mpl_student_loss(net, v, mpl_pseudo_labels(teacher, v, fed.mpl), fed.mpl, gen).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if phase == SEGMENTATION and not site.labelled:
                ema_update(teacher, net, fed.mpl.ema)
            losses.append(float(loss.detach()))
        return len(cases), float(np.mean(losses))

    class SiteClient(flwr.client.NumPyClient):
        def get_parameters(self, config):
            return _arrays(net)

        def fit(self, parameters, config):
            _load_arrays(net, parameters)
            weight, loss = local_round(int(config["round"]))
            return _arrays(net), weight, {**facts, "loss": loss}

    flwr.client.start_client(server_address=spec.address, client=SiteClient().to_client())


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(address: str, server: subprocess.Popen, timeout: float = 600.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the federated server exited with code {server.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the federated server did not listen on {address} within {timeout:.0f} s")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _start(work: Path, args: list[str], log: str) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    with open(work / log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.federated", *args, str(work)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process this module started, killing it if it does not stop within 30 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_rounds(spec: Spec, work: Path, progress: RoundProgress, poll: float = 1.0) -> list[dict]:
    """Start the server and one client process per site, report finished rounds, and return the history."""
    work.mkdir(parents=True, exist_ok=True)
    (work / SPEC).write_text(spec.model_dump_json(indent=2))
    done = len(json.loads((work / HISTORY).read_text())) if (work / HISTORY).exists() else 0
    progress(done, "resumed" if done else "")
    if done >= spec.total_rounds:
        return json.loads((work / HISTORY).read_text())
    server = _start(work, ["server"], "server.log")
    clients: list[subprocess.Popen] = []
    try:
        _wait_for_port(spec.address, server)
        clients = [_start(work, ["client", str(i)], f"site-{s.name}.log") for i, s in enumerate(spec.sites)]
        while server.poll() is None:
            time.sleep(poll)
            for site, client in zip(spec.sites, clients, strict=True):
                if client.poll() not in (None, 0):
                    raise RuntimeError(
                        f"site {site.name} exited with code {client.returncode}:\n"
                        + _tail(work / f"site-{site.name}.log")
                    )
            if (work / HISTORY).exists():
                history = json.loads((work / HISTORY).read_text())
                if len(history) > done:
                    done = len(history)
                    last = history[-1]
                    progress(done, f"{last['phase']}, {(last['bytes_down'] + last['bytes_up']) / 1e6:.1f} MB")
        if server.returncode:
            raise RuntimeError(
                f"the federated server exited with code {server.returncode}:\n" + _tail(work / "server.log")
            )
        for client in clients:  # the server has shut them down; a client that lingers is stopped below
            try:
                client.wait(timeout=30)
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in [server, *clients]:
            _stop(proc)
    history = json.loads((work / HISTORY).read_text())
    if len(history) < spec.total_rounds:
        raise RuntimeError(f"the server stopped after {len(history)} of {spec.total_rounds} rounds")
    progress(len(history), "done")
    return history


def train_federated(
    sites: Sequence[Site],
    labels: dict[int, str],
    run: TrainRun,
    cfg: TrainConfig | None = None,
    fed: FederatedConfig | None = None,
    progress: RoundProgress | None = None,
):
    """FedAvg over ``sites`` (exactly one labelled) in separate processes; writes ``run``'s bundle of the global
    weights.

    Resumes from the run's work folder after the last finished round. ``progress`` hears the rounds done after
    each one.
    """
    import torch

    from models.terms import TrainMode

    cfg, fed = cfg or TrainConfig(), fed or FederatedConfig()
    fed = fed.model_copy(update={"mpl": fed.mpl.with_anatomy(run.largest_component)})
    if sum(s.labelled for s in sites) != 1 or len({s.name for s in sites}) != len(sites):
        raise ValueError("federated training needs exactly one labelled site and distinct site names")
    spec = Spec(
        sites=list(sites),
        labels=labels,
        cfg=cfg,
        fed=fed,
        address=f"127.0.0.1:{free_port()}",
        device=run.device,
        init_weights=str(run.init_weights) if run.init_weights else None,
        threads=max(1, len(os.sched_getaffinity(0)) // len(sites)),
    )
    work = run.work()
    history = run_rounds(spec, work, progress or (lambda rnd, status: None))
    net = _network(spec)
    net.load_state_dict(torch.load(work / GLOBAL, map_location="cpu", weights_only=False)["net"])
    source = next(s for s in sites if s.labelled)
    facts = history[-1]["sites"]
    exchanged = [h["bytes_down"] + h["bytes_up"] for h in history]
    return run.write_bundle(
        net,
        cfg,
        labels,
        json.loads(facts[source.name]["label_volumes_ml"]),
        description=f"Federated model: {len(sites)} sites, labelled site {source.name}",
        training={
            "mode": TrainMode.FEDERATED.value,
            "rule": RULE,
            "sites": [
                {"name": s.name, "images": s.images, "labelled": s.labelled, "scans": facts[s.name]["scans"]}
                for s in sites
            ],
            "train_cases": json.loads(facts[source.name]["cases"]),
            "rounds": len(history),
            "bytes_per_round": {"mean": float(np.mean(exchanged)), "max": int(max(exchanged))},
            "bytes_total": int(sum(exchanged)),
            "weights": f"global FedAvg weights after round {len(history)}",
            "federated": fed.model_dump(mode="json"),
        },
        validation={"split": "none: the server holds no scans"},
        seconds=history[-1]["seconds"],
    )


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "server":
        run_server(Path(rest[0]))
    else:
        run_client(Path(rest[1]), int(rest[0]))
