// The HTTP API, always with the key in a header: it never goes into a URL.

export interface Model {
  name: string;
  version: string;
  ref: string;
  card: { description?: string; labels?: Record<string, string>; modality?: string };
}

export interface Scan {
  name: string;
  kind: string;
  state: "pending" | "succeeded" | "failed";
  size: number[] | null;
  spacing: number[] | null;
  volumes_ml: Record<string, number> | null;
  quality: Record<string, number> | null;
  fallback: boolean;
  fallback_reason: string | null;
  seconds: number | null;
  links: Record<string, string>;
}

export interface Job {
  id: string;
  state: string;
  phase: string | null;
  progress: number;
  error: string | null;
  model: string;
  bundle: string;
  bundle_used: string | null;
  pacs_viewer: string | null;
  adaptation: string;
  steps: number | null;
  domain: string | null;
  device: string | null;
  fallbacks: number;
  created_at: string;
  finished_at: string | null;
  timings: Record<string, number | null>;
  scans: Scan[];
}

export interface JobSummary {
  id: string;
  state: string;
  phase: string | null;
  progress: number;
  model: string;
  adaptation: string;
  scans: number;
  created_at: string;
}

const KEY = "ttaseg.key";

export const session = {
  key: (): string | null => sessionStorage.getItem(KEY),
  signIn: (key: string): void => sessionStorage.setItem(KEY, key),
  signOut: (): void => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

function authHeaders(key = session.key()): Record<string, string> {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function failure(status: number, statusText: string, body: string): Promise<ApiError> {
  let detail = statusText || `HTTP ${status}`;
  try {
    detail = JSON.parse(body).detail ?? detail;
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(status, detail);
}

export async function request(path: string, init: RequestInit = {}, key?: string): Promise<Response> {
  const response = await fetch(path, { ...init, headers: { ...authHeaders(key), ...init.headers } });
  if (!response.ok) throw await failure(response.status, response.statusText, await response.text());
  return response;
}

export const getJson = async <T>(path: string, key?: string): Promise<T> =>
  (await request(path, {}, key)).json() as Promise<T>;

export const getBuffer = async (path: string): Promise<ArrayBuffer> => (await request(path)).arrayBuffer();

/** Save a result through a blob URL, so that the key travels in a header. */
export async function download(path: string, filename: string): Promise<void> {
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** POST /v1/jobs with XMLHttpRequest, for upload progress events (fraction 0-1). */
export function submitJob(form: FormData, onProgress: (fraction: number) => void): Promise<{ id: string }> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total);
    xhr.onload = async () => {
      if (xhr.status === 202) resolve(JSON.parse(xhr.responseText));
      else reject(await failure(xhr.status, xhr.statusText, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload failed: no answer from the server"));
    xhr.send(form);
  });
}
