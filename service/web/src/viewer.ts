// A scan in three planes with its label map as a coloured overlay (NiiVue, WebGL2): the adapted or the
// source model's label map, and the voxel-wise uncertainty as a heat map.
import { MULTIPLANAR_TYPE, Niivue, NVImage, SHOW_RENDER, SLICE_TYPE } from "@niivue/niivue";
import { getBuffer } from "./api";
import { labelColour, labelRgb } from "./colours";
import { h } from "./dom";

function colormap(labels: Map<number, string>, hidden: Set<number>) {
  const cm = { R: [] as number[], G: [] as number[], B: [] as number[], A: [] as number[], I: [] as number[] };
  const names: string[] = [];
  for (let value = 0; value <= Math.max(0, ...labels.keys()); value++) {
    const [r, g, b] = value ? labelRgb(value) : [0, 0, 0];
    cm.R.push(r);
    cm.G.push(g);
    cm.B.push(b);
    cm.A.push(value && labels.has(value) && !hidden.has(value) ? 255 : 0);
    cm.I.push(value);
    names.push(labels.get(value) ?? "");
  }
  return { ...cm, labels: names };
}

const niftiName = (buffer: ArrayBuffer, stem: string): string => {
  const bytes = new Uint8Array(buffer, 0, 2);
  return bytes[0] === 0x1f && bytes[1] === 0x8b ? `${stem}.nii.gz` : `${stem}.nii`;
};

async function loadNifti(url: string, stem: string): Promise<NVImage> {
  const buffer = await getBuffer(url);
  return NVImage.loadFromUrl({ url: stem, name: niftiName(buffer, stem), buffer });
}

// uncertainty (normalised entropy, 0-1) below HEAT_MIN is not drawn; HEAT_MAP is a NiiVue colormap
const HEAT_MAP = "hot";
const HEAT_MIN = 0.1;
const HEAT_GRADIENT = "linear-gradient(to right, rgb(3 0 0), rgb(255 0 0) 37%, rgb(255 255 0) 75%, rgb(255 255 255))";

function range(id: string, value: string): HTMLInputElement {
  return h("input", { type: "range", id, min: "0", max: "100", value }) as HTMLInputElement;
}

function radio(name: string, value: string, text: string, checked: boolean): HTMLElement {
  const input = h("input", { type: "radio", name, value, id: `${name}-${value}`, ...(checked ? { checked: "" } : {}) });
  return h("div", { class: "choice" }, input, h("label", { for: `${name}-${value}` }, text));
}

/** Fractional position of the centre of the labelled voxels (NiiVue's RAS-ordered voxel grid). */
function labelCentre(volume: NVImage): [number, number, number] | null {
  const [, nx, ny] = volume.hdr!.dims;
  const data = volume.img!;
  const sum = [0, 0, 0];
  let count = 0;
  for (let index = 0; index < data.length; index++) {
    if (!data[index]) continue;
    sum[0] += index % nx;
    sum[1] += Math.floor(index / nx) % ny;
    sum[2] += Math.floor(index / (nx * ny));
    count++;
  }
  if (!count) return null;
  // permRAS: which file axis (1-3) runs along R, A, S; negative when it runs the other way
  const ras = volume.permRAS!.map((axis, i) => {
    const voxel = sum[Math.abs(axis) - 1] / count;
    return axis > 0 ? voxel : volume.dimsRAS![i + 1] - 1 - voxel;
  });
  return volume.convertVox2Frac(ras as [number, number, number]) as [number, number, number];
}

/** Build the viewer for one finished scan; `labels` maps label values to structure names. */
export async function createViewer(
  links: Record<string, string>,
  imageUrl: string,
  labels: Record<string, string>,
): Promise<HTMLElement> {
  const names = new Map(Object.entries(labels).map(([value, name]) => [Number(value), name]));
  const hidden = new Set<number>();
  const canvas = h("canvas", {
    id: "viewer-canvas",
    tabindex: "0",
    "aria-label": "Scan in axial, coronal and sagittal planes with the label map overlaid; click to move the planes",
  }) as HTMLCanvasElement;
  const status = h("p", { class: "muted", role: "status" }, "Loading the scan and its label map…");
  const opacity = range("overlay-opacity", "60");
  const legend = h("ul", { class: "legend", "aria-label": "Structures" });
  const adapts = Boolean(links.source_segmentation);
  const model = h(
    "fieldset",
    { class: "model", ...(adapts ? {} : { disabled: "", "aria-describedby": "model-note" }) },
    h("legend", {}, "Label map"),
    radio("model", "adapted", "Adapted model", true),
    radio("model", "source", "Source model", false),
    adapts ? null : h("p", { id: "model-note", class: "help" }, "This job did not adapt: its label map is the source model's."),
  );
  const heatToggle = h("input", { type: "checkbox", id: "uncertainty-toggle" }) as HTMLInputElement;
  const heatOpacity = range("uncertainty-opacity", "70");
  const heatNote = h("p", { class: "help", "aria-live": "polite" });
  const heat = h(
    "fieldset",
    { class: "heat" },
    h("legend", {}, "Uncertainty"),
    h("div", { class: "choice" }, heatToggle, h("label", { for: "uncertainty-toggle" }, "Show as heat map")),
    h("label", { for: "uncertainty-opacity" }, "Heat map opacity"),
    heatOpacity,
    h("div", {
      class: "colourbar",
      role: "img",
      style: `background:${HEAT_GRADIENT}`,
      "aria-label": `Colour scale: normalised entropy from ${HEAT_MIN} (dark red) through yellow to 1 (white)`,
    }),
    h("div", { class: "colourbar-ticks", "aria-hidden": "true" }, h("span", {}, String(HEAT_MIN)), h("span", {}, "1")),
    h("p", { class: "help" }, `Normalised entropy of the result's class probabilities; below ${HEAT_MIN} not drawn.`),
    heatNote,
  );
  const element = h(
    "div",
    { class: "viewer" },
    h("div", { class: "viewer-canvas" }, canvas),
    h(
      "div",
      { class: "viewer-controls" },
      status,
      model,
      h("label", { for: "overlay-opacity" }, "Overlay opacity"),
      opacity,
      legend,
      heat,
    ),
  );
  const show = async () => {
    const nv = new Niivue({
      backColor: [0.06, 0.07, 0.09, 1],
      crosshairColor: [1, 1, 1, 0.5],
      show3Dcrosshair: false,
      isColorbar: false,
      multiplanarLayout: MULTIPLANAR_TYPE.ROW,
      multiplanarShowRender: SHOW_RENDER.NEVER,
      multiplanarEqualSize: true,
    });
    await nv.attachToCanvas(canvas);
    const [image, labelMap] = await Promise.all([loadNifti(imageUrl, "scan"), loadNifti(links.segmentation, "labels")]);
    nv.addVolume(image);
    nv.addVolume(labelMap);
    // the shown label map is always the top layer; the heat map, once loaded, sits just above the scan
    let shown = labelMap;
    // optional layers load once, on first use; the controls' state decides what is drawn once they arrive
    let sourceMap: Promise<NVImage> | null = null;
    let heatMap: NVImage | null = null;
    let heatLoad: Promise<NVImage> | null = null;
    const showOpacity = () => nv.setOpacity(nv.volumes.indexOf(shown), Number(opacity.value) / 100);
    const heatOpacityNow = () => {
      if (heatMap) nv.setOpacity(nv.volumes.indexOf(heatMap), heatToggle.checked ? Number(heatOpacity.value) / 100 : 0);
    };
    const recolour = () => {
      shown.setColormapLabel(colormap(names, hidden));
      nv.updateGLVolume();
    };
    recolour();
    showOpacity();
    nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
    const centre = labelCentre(labelMap);
    if (centre) {
      nv.scene.crosshairPos = centre;
      nv.drawScene();
    }
    opacity.addEventListener("input", showOpacity);
    const chosenModel = () => model.querySelector<HTMLInputElement>("input:checked")!.value;
    model.addEventListener("change", async () => {
      model.setAttribute("aria-busy", "true");
      try {
        if (chosenModel() === "source") sourceMap ??= loadNifti(links.source_segmentation, "source");
        const source = sourceMap && (await sourceMap);
        const next = chosenModel() === "source" && source ? source : labelMap;
        if (next !== shown) {
          nv.removeVolume(shown);
          shown = next;
          nv.addVolume(shown);
          recolour();
          showOpacity();
        }
        element.dataset.model = next === labelMap ? "adapted" : "source";
      } catch (error) {
        sourceMap = null;
        model.querySelector<HTMLInputElement>("#model-adapted")!.checked = true;
        status.textContent = `The source model's label map could not be loaded: ${(error as Error).message}`;
      } finally {
        model.removeAttribute("aria-busy");
      }
    });
    const showHeat = async () => {
      try {
        if (heatToggle.checked)
          heatMap = await (heatLoad ??= loadNifti(links.uncertainty, "uncertainty").then((map) => {
            map.colormap = HEAT_MAP;
            map.cal_min = HEAT_MIN;
            map.cal_max = 1;
            nv.addVolume(map);
            nv.setVolume(map, 1);
            return map;
          }));
        heatOpacityNow();
        element.dataset.uncertainty = heatToggle.checked ? "shown" : "hidden";
      } catch (error) {
        heatToggle.checked = false;
        heatToggle.disabled = true;
        heatNote.textContent = `No uncertainty map: ${(error as Error).message}`;
      }
    };
    heatToggle.addEventListener("change", showHeat);
    heatOpacity.addEventListener("input", heatOpacityNow);
    for (const [value, name] of names) {
      if (!value) continue;
      const box = h("input", { type: "checkbox", id: `label-${value}`, checked: "" });
      box.addEventListener("change", () => {
        if ((box as HTMLInputElement).checked) hidden.delete(value);
        else hidden.add(value);
        recolour();
      });
      legend.append(
        h(
          "li",
          {},
          box,
          h(
            "label",
            { for: `label-${value}` },
            h("span", { class: "swatch", style: `background:${labelColour(value)}` }),
            name,
          ),
        ),
      );
    }
    status.textContent = "Drag or click to move the planes; scroll to change slice.";
    element.dataset.model = "adapted";
    element.dataset.ready = "true";
  };
  show().catch((error: Error) => {
    status.textContent = `The viewer could not show this scan: ${error.message}`;
    status.setAttribute("role", "alert");
    element.dataset.ready = "error";
  });
  return element;
}
