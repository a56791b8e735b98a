// ttaseg web app: sign in with an API key, submit scans, follow jobs, read and view results.
// Routes: #/ (new job and jobs), #/jobs/<id> and #/jobs/<id>/<scan> (a job, its scans, the viewer).
import { ApiError, download, getJson, type Job, type JobSummary, type Model, request, session, submitJob } from "./api";
import { fmt, h, table } from "./dom";
import { labelColour } from "./colours";

const main = document.getElementById("main")!;
const METHODS: [string, string][] = [
  ["mpl", "mpl: masked pseudo-labelling (default)"],
  ["tent", "tent: entropy minimisation"],
  ["norm", "norm: re-estimated normalisation"],
  ["none", "none: the source model as trained"],
];
const ACTIVE = ["queued", "running"];
let route = 0; // bumped on every navigation: a stale view's timers stop themselves

const badge = (state: string) => h("span", { class: `badge state-${state}` }, state);
const when = (iso: string) =>
  new Date(/Z|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`).toLocaleString([], {
    dateStyle: "short",
    timeStyle: "short",
  });

function alertBox(message: string): HTMLElement {
  return h("p", { class: "alert", role: "alert" }, message);
}

function repeat(view: number, ms: number, task: () => Promise<boolean>): void {
  const tick = async () => {
    if (view !== route) return;
    let again = true;
    try {
      again = await task();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signOut("Your key is no longer accepted.");
    }
    if (again && view === route) setTimeout(tick, document.hidden ? 10_000 : 2_000);
  };
  tick();
}

function show(...content: Node[]): void {
  main.replaceChildren(...content);
  main.querySelector<HTMLElement>("h1")?.focus();
}

function signOut(message?: string): void {
  session.signOut();
  location.hash = "#/";
  render(message);
}

function signInView(message?: string): void {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: "", spellcheck: "false" });
  const error = h("div", { "aria-live": "polite" }, message ? alertBox(message) : null);
  const form = h(
    "form",
    { class: "card narrow", id: "sign-in" },
    h("h1", { tabindex: "-1" }, "Sign in"),
    h("p", {}, "Use the API key your administrator gave you. It stays in this browser tab only."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = (input as HTMLInputElement).value.trim();
    try {
      await getJson("/v1/jobs?limit=1", key);
      session.signIn(key);
      render();
    } catch (err) {
      const text = err instanceof ApiError && err.status === 401 ? "That key was not accepted." : String(err);
      error.replaceChildren(alertBox(text));
    }
  });
  show(form);
}

function submitForm(): HTMLElement {
  const chosen: File[] = [];
  const fileInput = h("input", {
    id: "files",
    type: "file",
    multiple: "",
    accept: ".nii,.gz,.nrrd,.mha,.zip,.dcm",
    "aria-describedby": "files-help",
  }) as HTMLInputElement;
  const fileList = h("ul", { class: "files", "aria-label": "Chosen scans" });
  const model = h(
    "select",
    { id: "model", required: "", "aria-describedby": "model-help" },
    h("option", { value: "" }, "Loading models…"),
  ) as HTMLSelectElement;
  const modelHelp = h("p", { id: "model-help", class: "help" });
  const method = h("select", { id: "adaptation" }, ...METHODS.map(([v, text]) => h("option", { value: v }, text)));
  const progress = h("progress", { id: "upload-progress", max: "100", value: "0", hidden: "" });
  const status = h("div", { "aria-live": "polite", id: "submit-status" });
  const button = h("button", { type: "submit" }, "Submit job") as HTMLButtonElement;
  const drop = h(
    "div",
    { class: "dropzone" },
    h("p", { id: "files-help" }, "Drop NIfTI, NRRD or MHA scans (or zipped DICOM series) here, or choose files."),
    h("label", { for: "files" }, "Scan files"),
    fileInput,
    fileList,
  );
  const listFiles = () =>
    fileList.replaceChildren(
      ...chosen.map((file, index) => {
        const remove = h("button", { type: "button", class: "link", "aria-label": `Remove ${file.name}` }, "remove");
        remove.addEventListener("click", () => {
          chosen.splice(index, 1);
          listFiles();
        });
        return h("li", {}, `${file.name} (${(file.size / 1e6).toFixed(1)} MB) `, remove);
      }),
    );
  const add = (files: FileList | null) => {
    chosen.push(...Array.from(files ?? []));
    listFiles();
  };
  fileInput.addEventListener("change", () => {
    add(fileInput.files);
    fileInput.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    add(event.dataTransfer?.files ?? null);
  });
  getJson<Model[]>("/v1/models").then(
    (models) => {
      const describe = () => {
        const card = models.find((m) => m.ref === model.value)?.card;
        const structures = Object.entries(card?.labels ?? {}).filter(([value]) => value !== "0");
        modelHelp.textContent = [
          card?.description?.replace(/([^.])$/, "$1."),
          structures.length && `Structures: ${structures.map(([, n]) => n).join(", ")}.`,
        ]
          .filter(Boolean)
          .join(" ");
      };
      model.replaceChildren(...models.map((m) => h("option", { value: m.ref }, m.ref)));
      model.addEventListener("change", describe);
      describe();
    },
    (error) => status.replaceChildren(alertBox(`Models could not be loaded: ${error.message}`)),
  );
  const form = h(
    "form",
    { class: "card", id: "submit-form" },
    h("h2", {}, "New job"),
    drop,
    h("label", { for: "model" }, "Model"),
    model,
    modelHelp,
    h("label", { for: "adaptation" }, "Adaptation method"),
    method,
    h("label", { for: "upload-progress", class: "visually-hidden" }, "Upload progress"),
    progress,
    button,
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!chosen.length) return status.replaceChildren(alertBox("Choose at least one scan."));
    const body = new FormData();
    for (const file of chosen) body.append("files", file, file.name);
    body.append("model", model.value);
    body.append("adaptation", (method as HTMLSelectElement).value);
    button.disabled = true;
    progress.hidden = false;
    status.replaceChildren(h("p", {}, "Uploading…"));
    try {
      const accepted = await submitJob(body, (fraction) => {
        (progress as HTMLProgressElement).value = Math.round(fraction * 100);
        if (fraction >= 1) status.replaceChildren(h("p", {}, "Uploaded; the server is checking the scans…"));
      });
      location.hash = `#/jobs/${accepted.id}`;
    } catch (error) {
      status.replaceChildren(alertBox(`Not submitted: ${(error as Error).message}`));
      button.disabled = false;
      progress.hidden = true;
    }
  });
  return form;
}

function progressCell(job: { state: string; phase: string | null; progress: number }): HTMLElement {
  if (job.state !== "running") return h("span", {}, job.state === "queued" ? "waiting" : "");
  const label = `${job.phase ?? "running"} ${Math.round(job.progress)}%`;
  return h("span", {}, h("progress", { max: "100", value: String(job.progress), "aria-label": label }), ` ${label}`);
}

function jobsList(view: number): HTMLElement {
  const body = h("div", { id: "jobs" }, h("p", {}, "Loading…"));
  let last = "";
  repeat(view, 2000, async () => {
    const page = await getJson<{ items: JobSummary[]; total: number }>("/v1/jobs?limit=50");
    const snapshot = JSON.stringify(page.items);
    if (snapshot !== last) {
      last = snapshot;
      body.replaceChildren(
        page.items.length
          ? table(
              `Your ${page.total} job${page.total === 1 ? "" : "s"}, newest first`,
              ["Job", "Submitted", "Model", "Method", "Scans", "State", "Progress"],
              page.items.map((job) => [
                h("a", { href: `#/jobs/${job.id}` }, job.id.slice(0, 8)),
                when(job.created_at),
                job.model,
                job.adaptation,
                job.scans,
                badge(job.state),
                progressCell(job),
              ]),
            )
          : h("p", {}, "No jobs yet."),
      );
    }
    return true;
  });
  return h(
    "section",
    { class: "card", "aria-labelledby": "jobs-title" },
    h("h2", { id: "jobs-title" }, "Your jobs"),
    body,
  );
}

function homeView(view: number): void {
  show(
    h("h1", { tabindex: "-1", class: "visually-hidden" }, "ttaseg"),
    h("div", { class: "columns" }, submitForm(), jobsList(view)),
  );
}

function jobSummary(job: Job): HTMLElement {
  const t = job.timings;
  const rows: [string, Node | string][] = [
    ["State", h("span", {}, badge(job.state), " ", progressCell(job))],
    [
      "Model",
      job.bundle_used && job.bundle_used !== job.bundle ? `${job.bundle} (used ${job.bundle_used})` : job.bundle,
    ],
    ["Method", `${job.adaptation}${job.steps ? `, ${job.steps} steps requested` : ""}`],
    ["Device", job.device ?? "–"],
    ["Submitted", when(job.created_at)],
    [
      "Seconds",
      `queued ${fmt(t.queued_seconds)}, adaptation ${fmt(t.adapt_seconds)}, segmentation ${fmt(t.segment_seconds)}, total ${fmt(t.total_seconds)}`,
    ],
    ["Fallbacks", `${job.fallbacks} of ${job.scans.length} scans`],
  ];
  if (job.pacs_viewer) {
    rows.push(["Study", h("a", { href: job.pacs_viewer, target: "_blank", rel: "noopener" }, "Open in the PACS viewer")]);
  }
  return h(
    "div",
    {},
    h("dl", { class: "facts" }, ...rows.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
    job.error ? alertBox(job.error) : null,
  );
}

function downloadButton(text: string, path: string, filename: string, status: HTMLElement): HTMLElement {
  const button = h("button", { type: "button", class: "secondary" }, text);
  button.addEventListener("click", () =>
    download(path, filename).catch((error) => status.replaceChildren(alertBox(`Download failed: ${error.message}`))),
  );
  return button;
}

function scanCard(job: Job, scan: Job["scans"][number], labels: Record<string, string>): HTMLElement {
  const values = new Map(Object.entries(labels).map(([value, name]) => [name, Number(value)]));
  const status = h("div", { "aria-live": "polite" });
  const card = h(
    "article",
    { class: "card scan", "aria-labelledby": `scan-${scan.name}` },
    h("h3", { id: `scan-${scan.name}` }, scan.name, " ", badge(scan.state)),
  );
  if (scan.fallback)
    card.append(
      h(
        "p",
        { class: "fallback" },
        h("span", { class: "badge fallback-badge" }, "Fallback: source model"),
        ` ${scan.fallback_reason ?? "the adapted prediction was implausible"}`,
      ),
    );
  else if (scan.state === "succeeded" && job.adaptation !== "none")
    card.append(h("p", { class: "fallback" }, "Guard: the adapted prediction was kept."));
  card.append(
    h(
      "p",
      { class: "muted" },
      `${scan.kind}, ${scan.size?.join(" × ") ?? "?"} voxels of ${scan.spacing?.map((s) => s.toFixed(2)).join(" × ") ?? "?"} mm`,
    ),
  );
  if (scan.state !== "succeeded") return card;
  const adaptation = h("p", {}, "Adaptation: loading…");
  card.append(
    table(
      "Volumes",
      ["Structure", "mL"],
      Object.entries(scan.volumes_ml ?? {}).map(([name, ml]) => [
        h("span", {}, h("span", { class: "swatch", style: `background:${labelColour(values.get(name) ?? 1)}` }), name),
        fmt(ml),
      ]),
    ),
    table(
      "Quality signals",
      ["Signal", "Value"],
      Object.entries(scan.quality ?? {}).map(([name, value]) => [name.replaceAll("_", " "), fmt(value, 3)]),
    ),
    adaptation,
    h(
      "div",
      { class: "actions" },
      h("a", { class: "button", href: `#/jobs/${job.id}/${encodeURIComponent(scan.name)}` }, "Show in viewer"),
      downloadButton("Label map (NIfTI)", scan.links.segmentation, `${scan.name}_labels.nii.gz`, status),
      scan.links.dicom_seg ? downloadButton("DICOM SEG", scan.links.dicom_seg, `${scan.name}_seg.dcm`, status) : null,
      downloadButton(
        "Result (JSON)",
        `/v1/jobs/${job.id}/scans/${encodeURIComponent(scan.name)}/report`,
        `${scan.name}.json`,
        status,
      ),
    ),
    status,
  );
  getJson<Record<string, unknown>>(`/v1/jobs/${job.id}/scans/${encodeURIComponent(scan.name)}/report`).then(
    (report) => {
      const parts = [`${report.steps_run} steps in ${fmt(report.adaptation_seconds as number)} s`];
      if (report.adaptation_stopped_early) parts.push("stopped early");
      if (report.adaptation_restarts) parts.push(`${report.adaptation_restarts} restart(s)`);
      if ((report.adaptation_collapsed as string[]).length)
        parts.push(`collapsed: ${(report.adaptation_collapsed as string[]).join(", ")}`);
      adaptation.textContent = `Adaptation (${report.method}): ${parts.join(", ")}; scan segmented in ${fmt(scan.seconds)} s.`;
    },
    () => (adaptation.textContent = "Adaptation: not available."),
  );
  return card;
}

async function jobView(view: number, id: string, selected?: string): Promise<void> {
  const summary = h("div", {}, h("p", {}, "Loading…"));
  const cancel = h("button", { type: "button", class: "secondary", hidden: "" }, "Cancel job");
  const results = h("div", {});
  show(
    h("p", {}, h("a", { href: "#/" }, "← All jobs")),
    h("h1", { tabindex: "-1" }, `Job ${id.slice(0, 8)}`),
    h("section", { class: "card", "aria-label": "Summary" }, summary, cancel),
    results,
  );
  cancel.addEventListener("click", () => request(`/v1/jobs/${id}`, { method: "DELETE" }).catch(() => undefined));
  repeat(view, 2000, async () => {
    let job: Job;
    try {
      job = await getJson<Job>(`/v1/jobs/${id}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        summary.replaceChildren(alertBox("No such job among yours."));
        return false;
      }
      throw error;
    }
    summary.replaceChildren(jobSummary(job));
    cancel.hidden = !ACTIVE.includes(job.state);
    if (ACTIVE.includes(job.state)) return true;
    const done = job.scans.filter((s) => s.state === "succeeded");
    const labels = done.length ? (await getJson<{ labels: Record<string, string> }>(done[0].links.volumes)).labels : {};
    const current = done.find((s) => s.name === selected) ?? done[0];
    const viewer = current
      ? h(
          "section",
          { class: "card", "aria-labelledby": "viewer-title" },
          h("h2", { id: "viewer-title" }, `Viewer: ${current.name}`),
          await (
            await import("./viewer")
          ).createViewer(current.links, `/v1/jobs/${id}/scans/${encodeURIComponent(current.name)}/image`, labels),
        )
      : null;
    results.replaceChildren(
      ...(viewer ? [viewer] : []),
      h("h2", {}, "Scans"),
      h("div", { class: "scans" }, ...job.scans.map((scan) => scanCard(job, scan, labels))),
    );
    return false;
  });
}

function render(message?: string): void {
  route++;
  const signedIn = Boolean(session.key());
  document.getElementById("nav")!.hidden = !signedIn;
  if (!signedIn) return signInView(message);
  const [, page, id, scan] = location.hash.replace(/^#/, "").split("/");
  if (page === "jobs" && id) jobView(route, id, scan && decodeURIComponent(scan));
  else homeView(route);
}

document.getElementById("sign-out")!.addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => render());
render();
