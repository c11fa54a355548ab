// A span of time for people to read, in one whole unit ("95s", "3 hours"): the queue listing, the status
// page and a bounce's text each name the units their own way, and the status page switches sooner.

/** What follows the number for each unit, with any space before it: `{ seconds: ' s', ... }`. */
export interface DurationUnits {
  readonly seconds: string;
  readonly minutes: string;
  readonly hours: string;
  readonly days: string;
}

/** Where each unit gives way to the next, in seconds: [to minutes, to hours, to days]. */
export type UnitSwitches = readonly [number, number, number];

/** By default a unit is kept up to twice the next one: 119 s, then 2 minutes. */
const TWICE_THE_NEXT: UnitSwitches = [120, 7200, 172_800];

export function roughDuration(ms: number, units: DurationUnits, switches: UnitSwitches = TWICE_THE_NEXT): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < switches[0]) return `${s}${units.seconds}`;
  if (s < switches[1]) return `${Math.round(s / 60)}${units.minutes}`;
  if (s < switches[2]) return `${Math.round(s / 3600)}${units.hours}`;
  return `${Math.round(s / 86_400)}${units.days}`;
}
