// The Dockerfile as a maintained parser (dockerfile-ast) reads it: what the runtime stage (the last
// one) copies and how it runs, so a test can stage exactly what the image holds and run it the way the
// image does. Nothing here interprets RUN lines: the test supplies what a build stage produced.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { DockerfileParser, type Instruction, type JSONInstruction } from 'dockerfile-ast';

export const DOCKERFILE = path.resolve(__dirname, '..', '..', 'Dockerfile');

export interface CopyStep {
  /** The stage named by --from, or undefined for the build context. */
  readonly from?: string;
  /** Source paths; with --from, relative to that stage's WORKDIR when they lie under it. */
  readonly sources: readonly string[];
  /** Destination, relative to the runtime stage's WORKDIR ('' for the WORKDIR itself). */
  readonly dest: string;
  readonly line: number;
}

export interface RuntimeStage {
  readonly workdir: string;
  readonly env: Readonly<Record<string, string>>;
  readonly user?: string;
  readonly copies: readonly CopyStep[];
  /** The HEALTHCHECK's command as an argv (shell form becomes /bin/sh -c). */
  readonly healthcheck?: readonly string[];
  readonly entrypoint: readonly string[];
  readonly cmd: readonly string[];
  /** The RUN lines of the stage each COPY --from names, as written (to check a build stage's intent). */
  readonly runsOf: (stage: string) => readonly string[];
  /** What COPY and ADD take from the build context, in every stage (what .dockerignore must let through). */
  readonly contextSources: readonly { readonly source: string; readonly line: number }[];
}

const lineOf = (i: Instruction): number => i.getRange().start.line + 1;

function execForm(instruction: JSONInstruction, what: string): string[] {
  const strings = instruction.getJSONStrings().map((s) => s.getJSONValue());
  if (strings.length === 0) throw new Error(`Dockerfile:${lineOf(instruction)}: ${what} must use the exec form (a JSON array) so signals reach node`);
  return strings;
}

/** Reads the last stage of the Dockerfile; throws on anything it cannot stage faithfully. */
export function readRuntimeStage(file = DOCKERFILE): RuntimeStage {
  const dockerfile = DockerfileParser.parse(readFileSync(file, 'utf8'));
  const froms = dockerfile.getFROMs();
  const starts = froms.map((f) => f.getRange().start.line);
  const stageOf = (i: Instruction): number => starts.filter((s) => s <= i.getRange().start.line).length - 1;
  const stageIndex = (name: string): number => froms.findIndex((f) => f.getBuildStage() === name);
  const all = dockerfile.getInstructions();
  const inStage = (index: number): Instruction[] => all.filter((i) => stageOf(i) === index && i !== froms[index]);
  const workdirOf = (index: number, before = Infinity): string =>
    inStage(index)
      .filter((i) => i.getKeyword() === 'WORKDIR' && i.getRange().start.line < before)
      .reduce((dir, i) => path.posix.resolve(dir, i.getArguments()[0].getValue()), '/');

  const last = froms.length - 1;
  const runtime = inStage(last);
  const env: Record<string, string> = {};
  let user: string | undefined;
  let healthcheck: string[] | undefined;
  let entrypoint: string[] = [];
  let cmd: string[] = [];
  const copies: CopyStep[] = [];
  for (const i of runtime) {
    switch (i.getKeyword()) {
      case 'ENV':
        for (const p of (i as unknown as { getProperties(): { getName(): string; getValue(): string | null }[] }).getProperties()) env[p.getName()] = p.getValue() ?? '';
        break;
      case 'USER':
        user = i.getArguments()[0]?.getValue();
        break;
      case 'ENTRYPOINT':
        entrypoint = execForm(i as JSONInstruction, 'ENTRYPOINT');
        break;
      case 'CMD':
        cmd = execForm(i as JSONInstruction, 'CMD');
        break;
      case 'HEALTHCHECK': {
        const text = (i.getArgumentsContent() ?? '').replace(/^CMD\s+/, '');
        healthcheck = text === 'NONE' ? undefined : text.startsWith('[') ? (JSON.parse(text) as string[]) : ['/bin/sh', '-c', text];
        break;
      }
      case 'ADD':
        throw new Error(`Dockerfile:${lineOf(i)}: ADD in the runtime stage; use COPY (the test stages COPY only)`);
      case 'COPY': {
        const copy = i as JSONInstruction & { getFromFlag(): { getValue(): string | null } | null };
        const from = copy.getFromFlag()?.getValue() ?? undefined;
        const args = copy.getJSONStrings().length > 0 ? copy.getJSONStrings().map((s) => s.getJSONValue()) : copy.getArguments().map((a) => a.getValue());
        const workdir = workdirOf(last, i.getRange().start.line);
        const destAbs = path.posix.resolve(workdir, args[args.length - 1]);
        const finalWorkdir = workdirOf(last);
        if (destAbs !== finalWorkdir && !destAbs.startsWith(`${finalWorkdir}/`)) {
          throw new Error(`Dockerfile:${lineOf(i)}: COPY to ${destAbs}, outside WORKDIR ${finalWorkdir}: the test cannot stage it`);
        }
        let sources = args.slice(0, -1);
        if (from !== undefined) {
          const index = stageIndex(from);
          if (index < 0) throw new Error(`Dockerfile:${lineOf(i)}: COPY --from=${from}: no stage of that name`);
          const stageDir = workdirOf(index);
          sources = sources.map((s) => path.posix.relative(stageDir, path.posix.resolve(stageDir, s)));
        }
        copies.push({ from, sources, dest: path.posix.relative(finalWorkdir, destAbs), line: lineOf(i) });
        break;
      }
      default:
    }
  }
  const contextSources = all
    .filter((i) => ['COPY', 'ADD'].includes(i.getKeyword()))
    .filter((i) => !(i as unknown as { getFromFlag(): unknown }).getFromFlag())
    .flatMap((i) => {
      const copy = i as JSONInstruction;
      const args = copy.getJSONStrings().length > 0 ? copy.getJSONStrings().map((s) => s.getJSONValue()) : copy.getArguments().map((a) => a.getValue());
      return args.slice(0, -1).map((source) => ({ source: path.posix.normalize(source).replace(/\/$/, ''), line: lineOf(i) }));
    });
  return {
    contextSources,
    workdir: workdirOf(last),
    env,
    user,
    copies,
    healthcheck,
    entrypoint,
    cmd,
    runsOf: (stage) =>
      inStage(stageIndex(stage))
        .filter((i) => i.getKeyword() === 'RUN')
        .map((i) => i.getArgumentsContent() ?? ''),
  };
}
