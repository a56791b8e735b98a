// Label colours, shared by the viewer's overlay and legend and the volumes tables.

// distinct, saturated colours (none grey), so that the overlay stands out on MRI
const PALETTE: [number, number, number][] = [
  [230, 25, 75],
  [60, 180, 75],
  [0, 130, 200],
  [255, 225, 25],
  [245, 130, 48],
  [145, 30, 180],
  [70, 240, 240],
  [240, 50, 230],
];

export const labelRgb = (value: number): [number, number, number] => PALETTE[(value - 1) % PALETTE.length];
export const labelColour = (value: number): string => `rgb(${labelRgb(value).join(" ")})`;
