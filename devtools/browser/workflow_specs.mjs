// The pack's four example workflows, as specs that build_workflows.mjs turns into real graphs in the UI.
//
// A spec names nodes (type, title, widget values by name, note text), links (by output and input slot
// name, or by type where a node has one slot of that type), and a layout: bands (rows) of groups,
// groups of columns, columns of nodes, read left to right. Widget defaults are for a real SD1.5 user.

export const CHECKPOINT = 'v1-5-pruned-emaonly.safetensors';
export const SUBJECT_LORA = 'lora2/my_subject.safetensors';
export const SEED = 42;
const NOTE_W = 330;

const sampler = (title) => ({
  type: 'KSampler',
  title,
  widgets: { seed: SEED, steps: 20, cfg: 7.0, sampler_name: 'euler', scheduler: 'normal', denoise: 1.0 },
});
const checkpointLoader = () => ({
  type: 'CheckpointLoaderSimple',
  title: 'Load Checkpoint',
  widgets: { ckpt_name: CHECKPOINT },
  size: [300, 0],
});
// The DreamBooth evaluation prompts (Ruiz et al. 2023, dataset/prompts_and_classes.txt), written for the
// subject token 'sks' and the class 'toy' (object prompts) or 'dog' (live-subject prompts).
const DREAMBOOTH_OBJECT_PROMPTS = [
  'a sks toy in the jungle',
  'a sks toy in the snow',
  'a sks toy on the beach',
  'a sks toy on a cobblestone street',
  'a sks toy on top of pink fabric',
  'a sks toy on top of a wooden floor',
  'a sks toy with a city in the background',
  'a sks toy with a mountain in the background',
  'a sks toy with a blue house in the background',
  'a sks toy on top of a purple rug in a forest',
  'a sks toy with a wheat field in the background',
  'a sks toy with a tree and autumn leaves in the background',
  'a sks toy with the Eiffel Tower in the background',
  'a sks toy floating on top of water',
  'a sks toy floating in an ocean of milk',
  'a sks toy on top of green grass with sunflowers around it',
  'a sks toy on top of a mirror',
  'a sks toy on top of the sidewalk in a crowded street',
  'a sks toy on top of a dirt road',
  'a sks toy on top of a white rug',
  'a red sks toy',
  'a purple sks toy',
  'a shiny sks toy',
  'a wet sks toy',
  'a cube shaped sks toy',
];
const DREAMBOOTH_LIVE_PROMPTS = [
  'a sks dog in the jungle',
  'a sks dog in the snow',
  'a sks dog on the beach',
  'a sks dog on a cobblestone street',
  'a sks dog on top of pink fabric',
  'a sks dog on top of a wooden floor',
  'a sks dog with a city in the background',
  'a sks dog with a mountain in the background',
  'a sks dog with a blue house in the background',
  'a sks dog on top of a purple rug in a forest',
  'a sks dog wearing a red hat',
  'a sks dog wearing a santa hat',
  'a sks dog wearing a rainbow scarf',
  'a sks dog wearing a black top hat and a monocle',
  'a sks dog in a chef outfit',
  'a sks dog in a firefighter outfit',
  'a sks dog in a police outfit',
  'a sks dog wearing pink glasses',
  'a sks dog wearing a yellow shirt',
  'a sks dog in a purple wizard outfit',
  'a red sks dog',
  'a purple sks dog',
  'a shiny sks dog',
  'a wet sks dog',
  'a cube shaped sks dog',
];
const VALIDATION_PROMPTS = ['a photo of sks toy', 'a sks toy on the beach', 'a sks toy in the snow', 'a red sks toy'];

const note = (title, text, height) => ({ type: 'Note', title, text, size: [NOTE_W, height] });
const prompt = (title, text) => ({ type: 'CLIPTextEncode', title, widgets: { text }, size: [360, 120] });
const validation = (title, prompts, runName, height) => ({
  type: 'LoRA2Validation',
  title,
  widgets: { prompts: prompts.join('\n'), validate_every: 100, seed: SEED, steps: 20, width: 512, height: 512, cfg: 5.0, run_name: runName },
  size: [360, height],
});
const subjectDataset = () => ({
  type: 'LoRA2Dataset',
  title: 'Subject images',
  widgets: { folder: 'lora2_subject', caption_template: 'a photo of {trigger}', trigger: 'sks toy', resolution: 512 },
});
const heatmap = (title) => ({ type: 'LoRA2Heatmap', title, size: [420, 400] });

// Links from the checkpoint loader (node 'ckpt') to the inputs of node `to` named like its outputs.
const CHECKPOINT_OUTPUTS = { model: 'MODEL', clip: 'CLIP', vae: 'VAE' };
const fromCheckpoint = (to, ...inputs) => inputs.map((input) => ['ckpt', CHECKPOINT_OUTPUTS[input], to, input]);

// Train with validation samples, then the heatmap: the core of workflows 1 and 4.
const TRAIN_LINKS = [
  ...fromCheckpoint('dataset', 'vae', 'clip'),
  ...fromCheckpoint('train', 'model'),
  ['dataset', 'LORA2_DATASET', 'train', 'dataset'],
  ...fromCheckpoint('validation', 'clip', 'vae'),
  ['validation', 'LORA2_VALIDATION', 'train', 'validation'],
  ['train', 'LORA2_ADAPTER', 'heatmap', 'adapter'],
  ['train', 'LORA2_HISTORY', 'heatmap', 'history'],
];

// Two samples side by side from one prompt, latent and seed (workflows 1 and 3): each side is
// { key, sample, decode, preview } (its node-key suffix and titles); nodes sample_<key>, decode_<key>, preview_<key>.
const compareNodes = (sides) => ({
  positive: prompt('Prompt', 'a photo of sks toy on the beach'),
  negative: prompt('Negative', ''),
  latent: { type: 'EmptyLatentImage', title: 'Empty latent', widgets: { width: 512, height: 512, batch_size: 1 } },
  ...Object.fromEntries(sides.map((s) => [`sample_${s.key}`, sampler(s.sample)])),
  ...Object.fromEntries(sides.map((s) => [`decode_${s.key}`, { type: 'VAEDecode', title: s.decode }])),
  ...Object.fromEntries(
    sides.map((s) => [`preview_${s.key}`, { type: 'PreviewImage', title: s.preview, size: [260, 250] }]),
  ),
});
const promptLinks = [...fromCheckpoint('positive', 'clip'), ...fromCheckpoint('negative', 'clip')];
const samplerInputLinks = (sampler) => [
  ['positive', 'CONDITIONING', sampler, 'positive'],
  ['negative', 'CONDITIONING', sampler, 'negative'],
  ['latent', 'LATENT', sampler, 'latent_image'],
];
const decodeLinks = (keys) =>
  keys.flatMap((key) => [
    [`sample_${key}`, 'LATENT', `decode_${key}`, 'samples'],
    ...fromCheckpoint(`decode_${key}`, 'vae'),
  ]);
const previewLinks = (keys) => keys.map((key) => [`decode_${key}`, 'IMAGE', `preview_${key}`, 'images']);

const trainAndInspect = {
  name: 'lora2_train_and_inspect',
  nodes: {
    note_data: note(
      'About: data',
      'Put 5-30 photos of your subject in ComfyUI/input/lora2_subject (png, jpg or webp). A .txt file with ' +
        "the same name is used as that photo's caption; otherwise the caption is \"a photo of {trigger}\".\n\n" +
        'The first run encodes every photo and caption once with this checkpoint. The result is cached ' +
        '(in memory and in models/lora2_cache), so later runs start training at once.',
      200,
    ),
    ckpt: checkpointLoader(),
    note_models: note(
      'Other models: SDXL and Flux',
      'SDXL: choose an SDXL checkpoint and set resolution 1024 here and on "Empty latent". Keep targets "attn". ' +
        'SDXL learns faster per step: try 300 steps and learning rate 5e-5.\n\n' +
        'Flux: replace Load Checkpoint with Load Diffusion Model (UNETLoader), DualCLIPLoader (type flux) and ' +
        'Load VAE. The dataset needs no FluxGuidance. Use resolution 512-1024, training_dtype bfloat16 and ' +
        'turn gradient_checkpointing on.',
      230,
    ),
    dataset: subjectDataset(),
    note_train: note(
      'About: training',
      'LoRA² starts every attention layer at rank 4 and lets each one grow or shrink while it trains. ' +
        '500 steps suit 5-30 photos. Loss, total rank and size show on the node and in the console.\n\n' +
        'Cancel stops after the current step and saves what was trained, with its training state, to ' +
        'models/loras/lora2/checkpoint_stepN. To continue, pick that file in "resume" and queue again.\n\n' +
        'Validation prompts are sampled at step 0, every 100 steps and at the end: the grid shows on the Train ' +
        'node and is saved to output/lora2/my_subject/step_NNNNNN.png. It does not change what is trained.',
      290,
    ),
    validation: validation('Validation prompts', VALIDATION_PROMPTS, 'my_subject', 0),
    train: { type: 'LoRA2Train', title: 'Train LoRA²' },
    note_inspect: note(
      'About: inspect and prune',
      'The heatmap shows the rank each layer learned (rows: blocks in model order; columns: q, k, v, out) ' +
        'and how loss and total rank moved while training.\n\n' +
        "Prune keeps 90 % of each layer's importance for a smaller file. Both files are standard LoRAs in " +
        'models/loras/lora2 that any LoRA loader reads; "Save adapter" also writes the state to resume from.',
      210,
    ),
    heatmap: heatmap('Rank heatmap'),
    prune: { type: 'LoRA2Prune', title: 'Prune', widgets: { policy: 'importance mass', value: 0.9 } },
    save_pruned: { type: 'LoRA2Save', title: 'Save pruned', widgets: { filename: 'lora2/my_subject_pruned' } },
    save: { type: 'LoRA2Save', title: 'Save adapter', widgets: { filename: 'lora2/my_subject' } },
    note_compare: note(
      'About: compare',
      'The same prompt, seed and settings, sampled without and with the adapter just trained. ' +
        'Use the trigger word ("sks toy") in the prompt.',
      110,
    ),
    ...compareNodes([
      {
        key: 'base',
        sample: 'Sample without adapter',
        decode: 'Decode without adapter',
        preview: 'Preview without adapter',
      },
      { key: 'lora', sample: 'Sample with adapter', decode: 'Decode with adapter', preview: 'Preview with adapter' },
    ]),
  },
  links: [
    ...TRAIN_LINKS,
    ['train', 'LORA2_ADAPTER', 'prune', 'adapter'],
    ['prune', 'LORA2_ADAPTER', 'save_pruned', 'adapter'],
    ...fromCheckpoint('save_pruned', 'model'),
    ['train', 'LORA2_ADAPTER', 'save', 'adapter'],
    ...fromCheckpoint('save', 'model'),
    ...promptLinks,
    ...fromCheckpoint('sample_base', 'model'),
    ...samplerInputLinks('sample_base'),
    ['train', 'MODEL', 'sample_lora', 'model'],
    ...samplerInputLinks('sample_lora'),
    ...decodeLinks(['base', 'lora']),
    ...previewLinks(['base', 'lora']),
  ],
  layout: [
    [
      { group: '1 Data', columns: [['note_data', 'ckpt'], ['dataset']] },
      { group: '2 Train', columns: [['note_train', 'validation'], ['train']] },
      { group: '3 Inspect & prune', columns: [['note_inspect', 'prune'], ['heatmap'], ['save', 'save_pruned']] },
    ],
    [
      { group: null, columns: [['note_models']] },
      {
        group: '4 Compare',
        columns: [
          ['note_compare', 'latent'],
          ['positive', 'negative'],
          ['sample_base', 'sample_lora'],
          ['decode_base', 'decode_lora'],
          ['preview_base', 'preview_lora'],
        ],
      },
    ],
  ],
};

const inspectAnyLora = {
  name: 'lora2_inspect_any_lora',
  nodes: {
    note: note(
      'About: inspect any LoRA',
      'Works for any LoRA in models/loras: LoRA² files and ordinary ones (kohya, ComfyUI, diffusers/PEFT). ' +
        'For ordinary LoRAs the ranks come from the tensor shapes, and the heatmap also shows the effective ' +
        "rank of each layer: how many directions hold 90 % and 99 % of its singular-value energy.\n\n" +
        'Prune to budget keeps the strongest directions across all layers until the file fits 10 MB, and ' +
        'saves it as a new LoRA.',
      250,
    ),
    load: { type: 'LoRA2Load', title: 'Load LoRA file', widgets: { lora_name: SUBJECT_LORA }, size: [300, 0] },
    heatmap: heatmap('Rank heatmap'),
    prune: { type: 'LoRA2Prune', title: 'Prune to budget', widgets: { policy: 'budget (MB)', value: 10 } },
    save: { type: 'LoRA2Save', title: 'Save pruned', widgets: { filename: 'lora2/my_subject_10mb' } },
    heatmap_pruned: heatmap('Heatmap after pruning'),
  },
  links: [
    ['load', 'LORA2_ADAPTER', 'heatmap', 'adapter'],
    ['load', 'LORA2_ADAPTER', 'prune', 'adapter'],
    ['prune', 'LORA2_ADAPTER', 'save', 'adapter'],
    ['prune', 'LORA2_ADAPTER', 'heatmap_pruned', 'adapter'],
  ],
  layout: [[{ group: null, columns: [['load', 'note'], ['heatmap', 'prune'], ['save', 'heatmap_pruned']] }]],
};

const apply = {
  name: 'lora2_apply',
  nodes: {
    note: note(
      'About: using the adapter',
      'A LoRA² file is a standard LoRA: ComfyUI\'s own "LoraLoaderModelOnly" reads it just like LoRA² Apply, ' +
        'and both paths give the same image (same seed and settings).\n\n' +
        'LoRA² Apply also takes an adapter straight from LoRA² Train or LoRA² Prune, without saving it first.',
      180,
    ),
    ckpt: checkpointLoader(),
    adapter: { type: 'LoRA2Load', title: 'LoRA² adapter', widgets: { lora_name: SUBJECT_LORA }, size: [300, 0] },
    apply: { type: 'LoRA2Apply', title: 'Apply LoRA²', widgets: { strength: 1.0 } },
    stock: {
      type: 'LoraLoaderModelOnly',
      title: 'Stock LoRA loader',
      widgets: { lora_name: SUBJECT_LORA, strength_model: 1.0 },
      size: [300, 0],
    },
    ...compareNodes([
      {
        key: 'apply',
        sample: 'Sample with LoRA² Apply',
        decode: 'Decode (LoRA² Apply)',
        preview: 'Preview (LoRA² Apply)',
      },
      {
        key: 'stock',
        sample: 'Sample with stock loader',
        decode: 'Decode (stock loader)',
        preview: 'Preview (stock loader)',
      },
    ]),
  },
  links: [
    ...fromCheckpoint('apply', 'model'),
    ['adapter', 'LORA2_ADAPTER', 'apply', 'adapter'],
    ...fromCheckpoint('stock', 'model'),
    ...promptLinks,
    ['apply', 'MODEL', 'sample_apply', 'model'],
    ['stock', 'MODEL', 'sample_stock', 'model'],
    ...samplerInputLinks('sample_apply'),
    ...samplerInputLinks('sample_stock'),
    ...decodeLinks(['apply', 'stock']),
    ...previewLinks(['apply', 'stock']),
  ],
  layout: [
    [
      { group: null, columns: [['note', 'ckpt'], ['adapter', 'apply', 'stock'], ['positive', 'negative', 'latent']] },
      { group: null, columns: [['sample_apply', 'sample_stock'], ['decode_apply', 'decode_stock']] },
      { group: null, columns: [['preview_apply', 'preview_stock']] },
    ],
  ],
};

const validateAndEvaluate = {
  name: 'lora2_validate_and_evaluate',
  nodes: {
    note_train: note(
      'About: see it learn',
      'Photos of your subject go in ComfyUI/input/lora2_subject. While LoRA² trains, the validation prompts are ' +
        'sampled with the adapter as it is at step 0, every 100 steps and at the end; each grid shows on the ' +
        'Train node and is saved to output/lora2/my_subject/step_NNNNNN.png with the step and total rank on it. ' +
        'The red marks in the heatmap\'s history panel are those steps. Sampling does not change what is trained.',
      230,
    ),
    ckpt: checkpointLoader(),
    dataset: subjectDataset(),
    validation: validation('Validation prompts', VALIDATION_PROMPTS, 'my_subject', 0),
    train: { type: 'LoRA2Train', title: 'Train LoRA²' },
    heatmap: heatmap('Rank heatmap'),
    note_eval: note(
      'About: DreamBooth metrics',
      'The trained model samples the 25 DreamBooth object prompts (for a live subject such as a dog or cat, ' +
        'paste the 25 live-subject prompts from the note below instead, and change "toy" to your class). ' +
        'LoRA² Evaluate scores them as the DreamBooth paper does: DINO and CLIP-I (similarity to your photos) ' +
        'and CLIP-T (similarity to the prompt), raw cosines, per image and mean ± std.\n\n' +
        'It needs the models in ComfyUI/models/lora2_eval: dino-vits16 (facebook/dino-vits16) and ' +
        'clip-vit-b32 (openai/clip-vit-base-patch32), Hugging Face folders; nothing is downloaded.',
      270,
    ),
    prompts: validation('DreamBooth prompts (object)', DREAMBOOTH_OBJECT_PROMPTS, 'my_subject_eval', 560),
    note_live: note('DreamBooth prompts (live subject)', DREAMBOOTH_LIVE_PROMPTS.join('\n'), 560),
    sample: { type: 'LoRA2SamplePrompts', title: 'Sample the DreamBooth prompts' },
    preview_samples: { type: 'PreviewImage', title: 'Samples', size: [420, 420] },
    evaluate: {
      type: 'LoRA2Evaluate',
      title: 'Evaluate: DINO, CLIP-I, CLIP-T',
      widgets: { real_folder: 'lora2_subject' },
      size: [360, 0],
    },
    save_table: {
      type: 'SaveImage',
      title: 'Metrics table',
      widgets: { filename_prefix: 'lora2/my_subject_metrics' },
      size: [420, 420],
    },
  },
  links: [
    ...TRAIN_LINKS,
    ...fromCheckpoint('prompts', 'clip', 'vae'),
    ['train', 'MODEL', 'sample', 'model'],
    ['prompts', 'LORA2_VALIDATION', 'sample', 'prompts'],
    ['sample', 'IMAGE', 'preview_samples', 'images'],
    ['sample', 'IMAGE', 'evaluate', 'images'],
    ['sample', 'STRING', 'evaluate', 'prompts'],
    ['evaluate', 'IMAGE', 'save_table', 'images'],
  ],
  layout: [
    [
      {
        group: '1 Train, with validation samples',
        columns: [['note_train', 'ckpt'], ['dataset', 'validation'], ['train'], ['heatmap']],
      },
    ],
    [
      {
        group: '2 Evaluate as DreamBooth does',
        columns: [['note_eval', 'note_live'], ['prompts'], ['sample', 'preview_samples'], ['evaluate', 'save_table']],
      },
    ],
  ],
};

export const SPECS = [trainAndInspect, inspectAnyLora, apply, validateAndEvaluate];
