// `smtpmux try`: dry-run a selector (arrives with the selector authoring kit).
export const TRY_USAGE = 'Usage: smtpmux try --user EMAIL [--from ADDR] [--to ADDR] [--subject TEXT]';
export async function runTry(_argv: string[]): Promise<number> {
  console.error('smtpmux try: not implemented yet');
  return 2;
}
