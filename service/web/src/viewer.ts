// A scan in three planes with its label map as a coloured overlay (NiiVue, WebGL2).
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
  const opacity = h("input", {
    type: "range",
    id: "overlay-opacity",
    min: "0",
    max: "100",
    value: "60",
  }) as HTMLInputElement;
  const legend = h("ul", { class: "legend", "aria-label": "Structures" });
  const element = h(
    "div",
    { class: "viewer" },
    h("div", { class: "viewer-canvas" }, canvas),
    h(
      "div",
      { class: "viewer-controls" },
      status,
      h("label", { for: "overlay-opacity" }, "Overlay opacity"),
      opacity,
      legend,
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
    const [imageData, labelData] = await Promise.all([getBuffer(imageUrl), getBuffer(links.segmentation)]);
    const image = await NVImage.loadFromUrl({ url: "scan", name: niftiName(imageData, "scan"), buffer: imageData });
    const labelMap = await NVImage.loadFromUrl({
      url: "labels",
      name: niftiName(labelData, "labels"),
      buffer: labelData,
    });
    nv.addVolume(image);
    nv.addVolume(labelMap);
    const recolour = () => {
      labelMap.setColormapLabel(colormap(names, hidden));
      nv.updateGLVolume();
    };
    recolour();
    nv.setOpacity(1, Number(opacity.value) / 100);
    nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
    const centre = labelCentre(labelMap);
    if (centre) {
      nv.scene.crosshairPos = centre;
      nv.drawScene();
    }
    opacity.addEventListener("input", () => nv.setOpacity(1, Number(opacity.value) / 100));
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
    element.dataset.ready = "true";
  };
  show().catch((error: Error) => {
    status.textContent = `The viewer could not show this scan: ${error.message}`;
    status.setAttribute("role", "alert");
    element.dataset.ready = "error";
  });
  return element;
}
